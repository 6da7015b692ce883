"""Run by the battery: one entry under `strategy="ddp"` with 2 CPU processes (gloo).

Lightning's ddp launcher re-executes this script for rank 1, so it must be a file, not a pytest
function. Usage: ``python ddp_script.py ENTRY_ID OUT_DIR``; each rank saves its state to
OUT_DIR/rank{r}.pt (see battery.DumpState).
"""

import sys

import pytorch_lightning as pl
from battery import REGISTRY, DumpState, tiny_data, trainer

if __name__ == "__main__":
    entry_id, out = sys.argv[1], sys.argv[2]
    entry = next(e for e in REGISTRY if e.id == entry_id)
    pl.seed_everything(0)
    tr = trainer(out, [*entry.make(), DumpState(entry_id, out)], devices=2, strategy="ddp", max_epochs=8)
    tr.fit(entry.build_model(), tiny_data())
