"""promote and rollback are transactions, on a real TorchServe: killed (SIGKILL, a real process) after each of their
steps, they leave the old or the new version with a record that says which, and the server, once the record is
finished (the next promote or rollback, or a restart), serves what the record says. The store file is the judged
bytes; a refused promote keeps the rollback target; rollback works after a restart; one at a time."""

import fcntl
import json
import os
import subprocess
import sys

import pytest

import modelship as ms
from modelship.promotion import FAULT_ENV, LOCK, mar_version, versions
from modelship.serving.config import free_port

pytestmark = pytest.mark.serve

PROMOTE_STEPS = ("copied", "registered", "judged", "kept", "committed", "placed", "default", "cleared")
COMMITTED = PROMOTE_STEPS.index("committed")


@pytest.fixture(scope="module")
def archives(tmp_path_factory, cnn_onnx):
    """'digits' 1.0 and candidate archives 2.0 ... 9.0 of the same model (each passes the gate)."""
    work = tmp_path_factory.mktemp("promote-tx")
    first = ms.archive(cnn_onnx, work / "pristine", name="digits", workers=1, batch_size=1)
    cands = {f"{v}.0": ms.archive(cnn_onnx, work / f"c{v}", name="digits", version=f"{v}.0", workers=1, batch_size=1)
             for v in range(2, 10)}
    return {"first": first, "cands": cands}


@pytest.fixture
def bench(archives, tmp_path):
    """A store of its own serving 'digits' 1.0, a state folder and a free port."""
    import shutil

    (tmp_path / "store").mkdir()
    shutil.copy(archives["first"], tmp_path / "store" / "digits.mar")
    return {**archives, "store": tmp_path / "store", "state": tmp_path / "state", "port": free_port()}


def start(bench):
    return ms.serve(bench["store"], bench["state"], allow_promote=True, port=bench["port"], oip=False)


def cli_process(*args, fault=None):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "modelship", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def recorded(bench) -> str:
    """The default version of 'digits' that promote.json records (1.0 before any promote)."""
    path = bench["state"] / "promote.json"
    entry = (json.loads(path.read_text()).get("defaults") or {}).get("digits") if path.is_file() else None
    return entry["version"] if entry else "1.0"


def promote(bench, version, fault=None, *extra):
    return cli_process("promote", bench["cands"][version], "--state", bench["state"], "--model", "digits",
                       "--samples", "10", "--live", "0", *extra, fault=fault)


def rollback(bench, fault=None):
    return cli_process("promote", "--rollback", "--state", bench["state"], "--model", "digits", fault=fault)


def test_promote_killed_at_each_step_leaves_old_or_new_with_a_record_that_says_which(bench):
    server = start(bench)
    try:
        default = "1.0"
        for k, step in enumerate(PROMOTE_STEPS):
            version = f"{k + 2}.0"
            p = promote(bench, version, f"promote:{step}")
            assert p.returncode == -9, (step, p.stdout, p.stderr[-2000:])
            want = version if k >= COMMITTED else default
            assert recorded(bench) == want, step  # the record says which version is the default
            running = versions(server.info, "digits")[1]
            if k < COMMITTED:  # nothing was switched: the old version is wholly in place
                assert running == default and mar_version(bench["store"] / "digits.mar") == default, step
            elif step == "committed":  # a restart now serves what the record says: the new version
                server.stop()
                server = start(bench)
                assert versions(server.info, "digits") == ([version], version)
                assert mar_version(bench["store"] / "digits.mar") == version
            elif step == "placed":  # the store file is the new one; the next command switches the default
                assert running == default and mar_version(bench["store"] / "digits.mar") == version
            else:
                assert running == version and mar_version(bench["store"] / "digits.mar") == version, step
            assert not list(bench["store"].glob(".*.partial")), step
            default = want
        hidden = {p.name for p in bench["store"].glob(".promote-*")}
        assert ".promote-digits-2.0.mar" not in hidden  # the copy a killed promote left, swept by the next one
        p = rollback(bench)  # finishes nothing (9.0's promote got to its end), then rolls it back
        assert p.returncode == 0, p.stderr[-2000:]
        assert versions(server.info, "digits")[1] == "8.0" == recorded(bench)
        assert mar_version(bench["store"] / "digits.mar") == "8.0"
    finally:
        server.stop()
    server = start(bench)  # and after a restart, what the record says
    try:
        assert versions(server.info, "digits")[1] == "8.0"
        history = json.loads((bench["state"] / "promote.json").read_text())["history"]
        assert [h["decision"] for h in history][-1] == "rolled back"
    finally:
        server.stop()


def test_rollback_killed_at_each_step(bench):
    """Promoted from 1.0, then a rollback killed at each step: before its commit the promoted version stays; from
    its commit on, 1.0 (at once, or after a restart)."""
    server = start(bench)
    fresh = iter(["2.0", "3.0", "4.0", "5.0"])
    current = next(fresh)
    try:
        assert promote(bench, current).returncode == 0
        for step in ("registered", "committed", "placed", "default"):
            p = rollback(bench, f"rollback:{step}")
            assert p.returncode == -9, (step, p.stderr[-2000:])
            if step == "registered":
                assert recorded(bench) == current == versions(server.info, "digits")[1]
                continue
            assert recorded(bench) == "1.0", step
            server.stop()
            server = start(bench)
            assert versions(server.info, "digits") == (["1.0"], "1.0"), step  # a restart serves what it says
            assert mar_version(bench["store"] / "digits.mar") == "1.0"
            current = next(fresh)
            assert promote(bench, current).returncode == 0, step
    finally:
        server.stop()


def test_a_refused_promote_keeps_the_rollback_target_and_rollback_works_after_a_restart(bench):
    server = start(bench)
    try:
        assert promote(bench, "2.0").returncode == 0
        p = promote(bench, "3.0", None, "--slo-p95-ms", "0.001")  # judged, then refused on its latency
        assert p.returncode == 1 and "refused" in p.stderr
        assert versions(server.info, "digits") == (["1.0", "2.0"], "2.0")  # the rollback target is still there
        # while one promote or rollback runs, a second is refused with a message
        fd = os.open(bench["state"] / LOCK, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            p = rollback(bench)
            assert p.returncode == 2 and "another promote or rollback of this server is running" in p.stderr
        finally:
            os.close(fd)
        server.stop()
        server = start(bench)  # TorchServe forgets every version but the store file's: 2.0
        assert versions(server.info, "digits") == (["2.0"], "2.0")
        p = rollback(bench)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "version 1.0 is the default (was 2.0)" in p.stdout
        assert versions(server.info, "digits")[1] == "1.0" and mar_version(bench["store"] / "digits.mar") == "1.0"
    finally:
        server.stop()


def test_the_store_file_is_the_bytes_that_were_judged(bench, tmp_path):
    """The user's candidate file changed while it is judged: what is served, now and after a restart, is what was
    judged (the copy taken at the start), never the changed file."""
    import shutil

    cand = tmp_path / "cand.mar"
    shutil.copy(bench["cands"]["5.0"], cand)
    judged = cand.read_bytes()
    server = start(bench)
    try:
        def log(msg):
            if msg.startswith("judging"):
                shutil.copy(bench["cands"]["6.0"], cand)  # another archive under the user's path, mid-promote
        r = ms.promote(bench["state"], "digits", cand, samples=10, live=0, log=log)
        assert r.decision == "promoted" and r.version == "5.0"
        assert (bench["store"] / "digits.mar").read_bytes() == judged != cand.read_bytes()
    finally:
        server.stop()
