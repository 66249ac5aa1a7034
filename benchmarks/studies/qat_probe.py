"""QAT vs PTQ for the int8 image encoder (XNNPACK PT2E quantizer) on the real-image student of the
quant_sensitivity study: cosine to the fp32 encoder on the real test images and on dense patterns.

  python benchmarks/studies/qat_probe.py RUN DATA_JSON STEPS LR OUT.json

QAT here: BatchNorm folded into the convs, prepare_qat_pt2e with the XNNPACK quantizer's QAT config
(fake quant, moving-average min/max activation observers), the observers fed the calibration set in
batches of 16, then STEPS Adam steps (batch 16, mirrored half the time) on 1 - cos(int8-simulated,
fp32) over the calibration images; STEPS=0 converts right after the observers' pass."""
import copy, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import torch
from torch import nn
from quant_sensitivity import Inputs, run_b1
from mcad.runs import load_student
from mcad.quantize import pt2e

torch.manual_seed(0)
torch.set_num_threads(1)
if len(sys.argv) != 6:
    sys.exit("usage: python benchmarks/studies/qat_probe.py RUN DATA_JSON STEPS LR OUT.json")
RUN, DATA, OUT = sys.argv[1], sys.argv[2], sys.argv[5]
model, tok = load_student(RUN)
inp = Inputs(model, tok, DATA, calib=256)
enc = model.image_encoder().eval()
fp_test, fp_pat = run_b1(enc, inp.test), run_b1(enc, inp.patterns)
def cos(module):
    t, p = run_b1(module, inp.test), run_b1(module, inp.patterns)
    ct, cp = (t * fp_test).sum(1), (p * fp_pat).sum(1)
    return {"test_mean": round(float(ct.mean()), 4), "test_min": round(float(ct.min()), 4),
            "pat_mean": round(float(cp.mean()), 4), "pat_min": round(float(cp.min()), 4)}
keep = pt2e.DEFAULT_KEEP_FP32["xnnpack"]
ptq, _ = pt2e.quantize_core(enc, inp.calib, "xnnpack", keep_fp32=keep)
res = {"ptq": cos(ptq)}
print("ptq", res["ptq"], flush=True)

def fold_bn(m):
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    for name, child in m.named_children():
        if isinstance(child, nn.Sequential):
            mods = list(child)
            for i in range(len(mods) - 1):
                if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
                    mods[i] = fuse_conv_bn_eval(mods[i], mods[i + 1]); mods[i + 1] = nn.Identity()
            for i, mm in enumerate(mods):
                child[i] = mm
        fold_bn(child)
    return m

from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e, convert_pt2e
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
steps, lr = int(sys.argv[3]), float(sys.argv[4])
fenc = fold_bn(copy.deepcopy(enc)).eval()
core = pt2e.Core(fenc).eval()
with torch.no_grad():
    print("folded diff", float((core(torch.as_tensor(inp.test[:4])) - pt2e.Core(enc).eval()(torch.as_tensor(inp.test[:4]))).abs().max()))
from torch.export import Dim
calib = torch.as_tensor(inp.calib)
gm = torch.export.export(core, (calib[:2],), dynamic_shapes=({0: Dim("b", min=1, max=64)},)).module()
q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
quantizer = pt2e.as_quantizer(q, pt2e.parse_keep(keep, "xnnpack"))
prepared = prepare_qat_pt2e(gm, quantizer)
with torch.no_grad():  # observers see the calibration set first (the PTQ ranges as a start)
    for s in range(0, len(calib), 16):
        prepared(calib[s:s + 16])
ref_core = pt2e.Core(enc).eval()
opt = torch.optim.Adam([p for p in prepared.parameters() if p.requires_grad], lr=lr)
g = torch.Generator().manual_seed(0)
t0 = time.time()
for step in range(steps):
    idx = torch.randint(0, len(calib), (16,), generator=g)
    x = calib[idx]
    flip = torch.rand(16, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    with torch.no_grad():
        tgt = nn.functional.normalize(ref_core(x), dim=-1)
    out = nn.functional.normalize(prepared(x), dim=-1)
    loss = (1 - (out * tgt).sum(-1)).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 50 == 0:
        print(step, float(loss.detach()), flush=True)
print("train s", round(time.time() - t0, 1))
from torchao.quantization.pt2e import move_exported_model_to_eval
move_exported_model_to_eval(prepared)
converted = convert_pt2e(prepared)
res["qat"] = cos(converted); res["qat_cfg"] = {"steps": steps, "lr": lr}
print("qat", res["qat"], flush=True)
from mcad.io import write_json  # noqa: E402
write_json(OUT, res)
