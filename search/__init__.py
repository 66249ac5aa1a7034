"""Gallery search: `mcad index` (mcad.search.index), `mcad search` (mcad.search.query)."""
import logging

# faiss logs its CPU-feature probing at INFO on every import; keep `mcad` output readable.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
