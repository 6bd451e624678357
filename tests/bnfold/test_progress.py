"""Progress: bars only on a terminal, a plain line per step otherwise, no tqdm warnings; train says
where a resumed run starts and, on Ctrl-C, what was saved and how to continue."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from bnfold.progress import PlainProgress, on_terminal, progress

TRAIN = [sys.executable, "-m", "bnfold", "train", "--model", "lenet", "--dataset", "digits", "--batch-size", "32",
         "--device", "cpu", "--threads", "1"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_drawn_on_a_terminal_only() -> None:
    assert not on_terminal(io.StringIO())
    assert on_terminal(_Terminal())
    assert isinstance(progress(range(3), stream=io.StringIO()), PlainProgress)
    assert not isinstance(progress(range(3), stream=_Terminal()), PlainProgress)


def test_a_count_past_the_total_is_clamped_without_a_tqdm_warning() -> None:
    stream = _Terminal()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # tqdm's "clamping frac to range [0, 1]" would raise here
        with progress(total=0.15, desc="measure", unit="s", stream=stream) as bar:
            bar.n = 0.1500000001   # what bench.timing sets: a float sum of seconds
            bar.refresh()
            bar.update(5)
        assert bar.n == bar.total


def test_off_a_terminal_a_step_is_one_plain_line() -> None:
    stream = io.StringIO()
    bar = progress(["onnx", "torchscript"], desc="export", unit="file", stream=stream)
    assert list(bar) == ["onnx", "torchscript"]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export: 2/2 files in ") and "\r" not in stream.getvalue()
    quiet = io.StringIO()
    list(progress(range(4), desc="epoch 1", stream=quiet, summary=False))
    list(progress(range(4), desc="zoo", stream=quiet, enabled=False))
    assert quiet.getvalue() == ""


@pytest.mark.slow   # two short training runs in subprocesses (about 8 s of CPU each)
def test_train_in_a_log_says_what_ctrl_c_saved_and_where_the_resume_starts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = [*TRAIN, "--steps-per-epoch", "2", "--out", str(out)]
    # stdout is a pipe, as when it goes to a log file: no bars.
    process = subprocess.Popen([*common, "--epochs", "500"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    try:
        deadline = time.monotonic() + 240
        for line in process.stdout:   # until the first epoch has been saved
            seen.append(line)
            if line.startswith("epoch 1/500") or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = "".join(seen) + rest
    assert any(line.startswith("epoch 1/500") for line in seen), text
    assert process.returncode == 130, text
    assert "\r" not in text and "TqdmWarning" not in text and "it/s" not in text and "Traceback" not in text
    assert all(len(line) < 500 for line in text.splitlines())   # a redrawn bar ran to thousands
    message = next(line for line in rest.splitlines() if line.startswith("interrupted in epoch"))
    assert f"{out / 'last.pt'} holds epoch" in message and "best.pt: epoch" in message
    assert f"--out {out} --resume" in message
    done = int(message.split(" holds epoch ")[1].split()[0])
    again = subprocess.run([*common, "--epochs", str(done + 1), "--resume"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming from epoch {done + 1} of {done + 1} ({out / 'last.pt'} finished epoch {done})" in again.stdout
    assert [line.split()[1] for line in again.stdout.splitlines() if line.startswith("epoch ")] == \
        [f"{done + 1}/{done + 1}"]


def test_a_pipeline_interrupted_says_what_finished_and_how_to_go_on(tmp_path: Path) -> None:
    from bnfold.pipeline import PipelineConfig, interrupted_message, run_pipeline

    config = PipelineConfig(out=str(tmp_path / "p"))
    said: list[str] = []

    def log(line: str) -> None:   # Ctrl-C as the first stage starts
        said.append(line)
        if line == "== train":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, log=log)
    assert said[-1] == ("pipeline interrupted in stage train; `bnfold pipeline` has no resume: run it again with "
                        "--force to start afresh")
    later = interrupted_message(config, ["train", "fold", "export"])
    checkpoint = tmp_path / "p" / "train" / "best.pt"
    assert later.startswith("pipeline interrupted in stage export (finished: train, fold): the trained model is "
                            f"{checkpoint}")
    assert f"bnfold export {checkpoint} --out {tmp_path / 'p' / 'export'} --force" in later
