"""Every bad input ends in one clean error (#11): exit 2, one `error:` line naming the problem and the fix, no
traceback, inputs and unrelated files untouched. Validation functions are tested in-process (fast); each class of
input is also driven once through a tool as a subprocess, on tiny models made by transformers."""
import json
import os

import pytest

from youzhi_ms.errors import YouzhiError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------- torn logs
def test_torn_loss_log_tail_is_dropped_on_resume(tmp_path):
    from youzhi_ms.train.loss_log import append_row, read_loss_log, truncate_loss_log
    log = str(tmp_path / "loss_log.jsonl")
    for step in (1, 2, 3):
        append_row(log, {"step": step, "loss": 1.0 / step, "lr": 1e-3})
    with open(log, "a") as f:
        f.write('{"step": 4, "loss": 0.2')  # killed while appending step 4
    assert [r["step"] for r in read_loss_log(log)] == [1, 2, 3]
    truncate_loss_log(log, 2)  # resume from the step-2 checkpoint
    append_row(log, {"step": 3, "loss": 0.3, "lr": 1e-3})
    assert [r["step"] for r in read_loss_log(log)] == [1, 2, 3]
    with open(log, "a") as f:
        f.write('{"step": 4}\n')
    assert [r["step"] for r in read_loss_log(log)] == [1, 2, 3, 4]  # a whole last line is kept


def test_damaged_loss_log_line_is_refused_with_its_number(tmp_path):
    from youzhi_ms.train.loss_log import truncate_loss_log
    log = tmp_path / "loss_log.jsonl"
    log.write_text('{"step": 1, "loss": 1}\n\x00\x00garbage\n{"step": 2, "loss": 1}\n')
    before = log.read_bytes()
    with pytest.raises(YouzhiError, match="line 2 is not a loss-log row; the file is damaged"):
        truncate_loss_log(str(log), 1)
    assert log.read_bytes() == before
