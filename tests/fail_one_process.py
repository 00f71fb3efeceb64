"""``chatrl`` with a deliberate UserError on process 1 at its ``FAIL_AT``-th LM micro-batch.

Run under torchrun by tests/test_distributed.py: a failure on one process must take the whole
job down with its error, not leave the other processes waiting in a collective.
"""

import os

from chatrl.cli import main
from chatrl.errors import UserError
from chatrl.train import lm

RANK, FAIL_AT = int(os.environ["RANK"]), int(os.environ["FAIL_AT"])
collate = lm.collate
calls = 0


def failing_collate(rows, pad_id):
    global calls
    calls += 1
    if RANK == 1 and calls == FAIL_AT:
        raise UserError("deliberate failure")
    return collate(rows, pad_id)


lm.collate = failing_collate
main()
