"""`make teachers`: train the dual-stream and the single-stream teacher on the embedded benchmark.

1. a BPE tokenizer on the training captions;
2. the dual teacher D (CLIP loss);
3. the fusion teacher F: cross-attention layers on D's frozen towers, trained with ITM on hard
   negatives mined with D (ALBEF-style), in batches of D's nearest neighbours so the confusers meet;
4. test retrieval of D, and of F re-ranking D's top-k; `metrics.json` + a table.
Every step resumes from its checkpoint; finished models are not retrained.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from mcad.config import load_command_config
from mcad.checks import TEACHERS as TEACHER_COUNTS, require_counts
from mcad.accelerator import resolve_device
from mcad.data.images import normalize
from mcad.data.stream import StepFeed
from mcad.evaluate import encode_images, evaluate_dual, evaluate_rerank, image_keys
from mcad.io import atomic_write_text, write_json
from mcad.distill.losses import candidates_with_positive, clip_loss, itm_listwise_loss
from mcad.models.checkpoint import check_tokenizer, load_model, read_metadata, save_model
from mcad.models.registry import count_params, create_model, with_tokenizer
from mcad.retrieval import recall_table
from mcad.logs import add_file_log
from mcad.runs import run_folder_lock
from mcad.distill.sampling import ConfuserBatches, RandomBatches, caption_choice, nearest_neighbours
from mcad.tokenizer import Tokenizer, train_bpe
from mcad.distill.trainer import Trainer, recipe_diff

log = logging.getLogger("mcad.distill.teachers")


def load_split(data, split: str, size: int):
    """(pixels, Corpus) of one split of a data spec (`data.*` keys, or a synthetic root), decoded
    whole: mcad.data.spec.load_split (tests and small sets; the commands stream with open_split)."""
    from mcad.data.spec import load_split as load

    return load(data, split, size)


def open_split(data, split: str, size: int, workers=None):
    """(mcad.data.stream.Images, Corpus) of one split as the project's own models see it."""
    from mcad.data.spec import open_split as open_

    return open_(data, split, size, workers)


def teacher_recipes(cfg: dict, data: str | None) -> dict[str, dict]:
    """What decides each teacher: its own section, the tokenizer, the seed and the data (`data_key`
    of the training images and captions); the fusion teacher's includes the dual's, on which it
    is built. Saved in each checkpoint (and training checkpoint), compared before any reuse."""
    dual = {"seed": cfg.get("seed"), "tokenizer": cfg.get("tokenizer"), "data": data, "dual": cfg.get("dual")}
    recipes = {"dual": dual, "fusion": {**dual, "fusion": cfg.get("fusion")}}
    return json.loads(json.dumps(recipes, default=str))  # as it reads back from a file


def saved_recipe(path: Path, out: Path, name: str) -> dict | None:
    """The recipe `path` was trained with; for a checkpoint from before recipes were saved, the
    one metrics.json recorded beside it (without the data, which it did not record)."""
    extra = json.loads(read_metadata(path).get("extra") or "{}")
    if "recipe" in extra:
        return extra["recipe"]
    old = out / "metrics.json"
    if old.exists():
        recipe = teacher_recipes(json.loads(old.read_text()).get("config") or {}, None)[name]
        recipe.pop("data")
        return recipe
    return None


def check_reuse(path: Path, out: Path, name: str, recipe: dict) -> None:
    """A finished teacher is reused only for the recipe it was trained with: anything else would
    evaluate (and record in metrics.json) a model the config does not describe."""
    saved = saved_recipe(path, out, name)
    if saved is None:
        log.warning("%s: records no recipe (saved by an older mcad); reused as it is", path)
        return
    diff = recipe_diff(saved, {k: v for k, v in recipe.items() if k in saved})
    if diff:
        raise ValueError(f"{path}: trained with another recipe (differs in {', '.join(diff)}); delete it "
                         f"(and what was made from it: fusion, cache/) to retrain, or give another out=")


def train_dual(cfg: dict, tok: Tokenizer, pixels, ids, corpus, out: Path, seed: int, recipe: dict | None = None,
               device: torch.device | None = None):
    device = device or torch.device("cpu")  # batches follow the model (the same tensors on the CPU)
    torch.manual_seed(seed)
    model = create_model(cfg["model"], **with_tokenizer({}, tok)).to(device)
    keys = torch.as_tensor(image_keys(corpus)).to(device)
    caps = corpus.image_captions()
    batches = RandomBatches(len(pixels), int(cfg["batch_size"]), seed)
    feed = StepFeed([pixels], batches, int(cfg["steps"]))  # decoded ahead of the step, off this thread
    trainer = Trainer({"model": model}, cfg, out / "dual.ckpt.pt", desc="dual teacher", recipe=recipe)
    trainer.resume()

    def loss_fn(step: int):
        idx = batches(step)
        cap = caption_choice(len(pixels), caps, seed, step, idx)
        img, txt, scale = model(normalize(feed(step)[0], model.image_mean, model.image_std).to(device),
                                torch.as_tensor(ids[cap]).to(device))
        return clip_loss(img, txt, scale, keys[idx]), {"scale": float(scale.detach())}

    t0 = time.time()
    trainer.fit(loss_fn)
    return model, time.time() - t0


def train_fusion(cfg: dict, dual, pixels, ids, corpus, out: Path, seed: int, recipe: dict | None = None,
                 device: torch.device | None = None):
    device = device or torch.device("cpu")
    torch.manual_seed(seed + 1)
    fcfg = create_model(cfg["model"]).config
    fcfg["dual"] = dual.config
    from mcad.models.registry import build_model

    fusion = build_model(fcfg)
    fusion.dual.load_state_dict(dual.state_dict())
    fusion.dual.requires_grad_(False)
    fusion.to(device)
    dual = dual.to(device)
    keys = torch.as_tensor(image_keys(corpus)).to(device)
    caps = corpus.image_captions()
    log.info("fusion: nearest neighbours of %d training images under the dual teacher", len(pixels))
    emb = encode_images(dual, pixels)
    nb = nearest_neighbours(emb, int(cfg.get("neighbours", 3)), keys=keys.numpy())  # other scenes: confusers
    batches = ConfuserBatches(nb, int(cfg["batch_size"]), seed, group=int(cfg.get("neighbours", 3)) + 1)
    feed = StepFeed([pixels], batches, int(cfg["steps"]))
    trainer = Trainer({"fusion": fusion}, cfg, out / "fusion.ckpt.pt", desc="fusion teacher", recipe=recipe)
    trainer.resume()

    def loss_fn(step: int):
        idx = batches(step)
        cap = caption_choice(len(pixels), caps, seed, step, idx)
        px = normalize(feed(step)[0], dual.image_mean, dual.image_std).to(device)
        ids_b = torch.as_tensor(ids[cap]).to(device)
        with torch.no_grad():
            img_tok, txt_tok = fusion.image_tokens(px), fusion.text_tokens(ids_b)
            v, t = dual.encode_image(px), dual.encode_text(ids_b)
            sim = v @ t.T
        kb = keys[idx]
        # each image with its k-1 most confusable captions under D, and each caption with its
        # images: the lists F re-ranks at test time
        k = int(cfg.get("list_k", 4))
        ct = candidates_with_positive(sim, kb, k)
        ci = candidates_with_positive(sim.T, kb, k)
        B = len(idx)
        rows = torch.arange(B, device=device)[:, None].expand_as(ct)
        i_idx = torch.cat([rows.reshape(-1), ci.reshape(-1)])
        t_idx = torch.cat([ct.reshape(-1), rows.reshape(-1)])
        _, m = fusion.fuse(img_tok[i_idx], txt_tok[t_idx], ids_b[t_idx])
        l_i2t, acc_i2t = itm_listwise_loss(m[:B * ct.shape[1]].view(B, -1))
        l_t2i, acc_t2i = itm_listwise_loss(m[B * ct.shape[1]:].view(B, -1))
        return (l_i2t + l_t2i) / 2, {"list_acc_i2t": float(acc_i2t), "list_acc_t2i": float(acc_t2i)}

    t0 = time.time()
    trainer.fit(loss_fn)
    return fusion, time.time() - t0


def main(argv: list[str]) -> int:
    from mcad.data.spec import check_train_and_eval_files, parse, shorthand

    # keys checked against the recipe: a typo is an error; `data=PATH` is short for the data spec
    cfg = load_command_config(argv, "teachers", shorthands={"data": shorthand})
    require_counts(cfg, TEACHER_COUNTS)
    torch.set_num_threads(int(cfg.get("threads", 2)))
    data, out, seed = parse(cfg["data"]), Path(cfg["out"]), int(cfg["seed"])
    check_train_and_eval_files(data, "test")  # before the run folder exists
    device = resolve_device(cfg.get("device"))
    with run_folder_lock(out, "teachers"):  # one writer: a second run into out= is refused, naming this one
        return train_teachers(cfg, data, out, seed, device)


def train_teachers(cfg: dict, data, out: Path, seed: int, device) -> int:
    """Both teachers into `out` (held by this process), then their test metrics."""
    add_file_log(out / "train.log")
    timings: dict[str, float] = {}

    from mcad.data.spec import split_line, split_record

    t0 = time.time()
    dual_cfg = create_model(cfg["dual"]["model"]).config
    size = int(dual_cfg["image"]["image_size"])
    workers = cfg.get("workers")
    train_px, train_c = open_split(data, "train", size, workers)
    test_px, test_c = open_split(data, "test", size, workers)
    timings["load_data_s"] = time.time() - t0

    recipes = teacher_recipes(cfg, train_px.key(train_c.captions))
    tok_path = out / "tokenizer.json"
    # the tokenizer belongs to the dual teacher (finished or partial) whose recipe is checked below;
    # without one it is trained again, so a tokenizer of other captions is never picked up
    if tok_path.exists() and ((out / "dual.safetensors").exists() or (out / "dual.ckpt.pt").exists()):
        tok = Tokenizer.load(tok_path)
    else:
        tc = cfg["tokenizer"]
        tok = train_bpe(train_c.captions, int(tc["vocab_size"]), int(tc["context_length"]))
        tok.save(tok_path)
    train_ids, test_ids = tok.encode_batch(train_c.captions), tok.encode_batch(test_c.captions)

    def load_or_train(name: str, train):
        """A teacher already saved is loaded (make does not redo it); otherwise trained and saved."""
        path = out / f"{name}.safetensors"
        if path.exists():
            check_reuse(path, out, name, recipes[name])
            model = load_model(path, kind=name)
        else:
            model, timings[f"{name}_train_s"] = train()
            save_model(model, path, extra={"recipe": recipes[name]}, tokenizer=tok)
            (out / f"{name}.ckpt.pt").unlink(missing_ok=True)  # the finished model replaces its resume point
        check_tokenizer(model.config, tok, path, tok_path)
        return model

    dual = load_or_train("dual", lambda: train_dual(cfg["dual"], tok, train_px, train_ids, train_c, out, seed,
                                                    recipes["dual"], device)).to(device)
    fusion = load_or_train("fusion", lambda: train_fusion(cfg["fusion"], dual, train_px, train_ids, train_c, out, seed,
                                                          recipes["fusion"], device)).to(device)

    t0 = time.time()
    d_metrics, sim = evaluate_dual(dual, test_px, test_ids, test_c.caption_to_image)
    k = int(cfg["eval"]["rerank_k"])
    f_metrics = evaluate_rerank(fusion, test_px, test_ids, test_c.caption_to_image, sim, k)
    timings["eval_s"] = time.time() - t0
    rows = {"dual teacher": d_metrics, f"fusion teacher (re-rank dual top-{k})": f_metrics}
    table = recall_table(rows)
    evaluated = split_record(test_c, data)
    print(split_line(evaluated))
    print(table)
    metrics = {"test": rows, "data": evaluated, "params": {"dual": count_params(dual), "fusion": count_params(fusion)},
               "timings_s": timings, "config": cfg,
               "fusion_beats_dual_r1": bool(f_metrics["t2i_r1"] > d_metrics["t2i_r1"] and f_metrics["i2t_r1"] > d_metrics["i2t_r1"])}
    write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "metrics.md", table + "\n")
    log.info("teachers: %s", {k: round(v, 1) for k, v in timings.items()})
    return 0
