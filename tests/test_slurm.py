"""The SLURM batch scripts on real daemons: warning signal -> checkpoint -> requeue -> resume.

A one-node cluster (munge, slurmctld, slurmd from Debian's packages, installed on first use)
runs on localhost for this module. Each test submits a launch script with sbatch on the demo
data on the CPU, sends SLURM's warning signal to the batch shell the way `--signal=B:USR1@...`
does, and follows the job through its requeue to the end of the run.

Skipped only where no cluster can exist (not root, or neither SLURM nor apt-get); in CI
(CI=true) that is a failure instead, so the proof cannot quietly disappear.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from netns_cluster import NetnsCluster
from netns_cluster import why_unavailable as netns_unavailable
from slurm.cluster import LocalSlurm, pid_alive, why_unavailable
from slurm.trainrun import REPO, TINY_TRAINING, events, last_train_step, read_metrics, resumes, tail, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_STEPS = 300  # about 10 s of training here; the signal comes at step SIGNAL_AFTER_STEP
SIGNAL_AFTER_STEP = 15
CKPT_EVERY = 50


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _cluster(request, reason, prefix, hosts=None):
    """A LocalSlurm for a test module, stopped at its end; its files are kept when a test failed.
    Skipped where it cannot run (``reason``), which in CI is a failure instead."""
    if reason:
        if _in_ci():
            pytest.fail(f"CI must run the SLURM tests, but: {reason}")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = LocalSlurm(root, hosts=hosts)
    failed_before = request.session.testsfailed
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    if request.session.testsfailed == failed_before:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\nSLURM configuration and daemon logs kept in {root}")


@pytest.fixture(scope="module")
def slurm(request):
    yield from _cluster(request, why_unavailable(), "densenet-slurm-")


@pytest.fixture(scope="module")
def slurm_two_hosts(request):
    """Two simulated hosts (network namespaces, tests/netns_cluster.py), a slurmd on each."""
    reason = why_unavailable() or netns_unavailable()
    if reason:
        yield from _cluster(request, reason, "densenet-slurm2-")
        return
    with NetnsCluster(["node1", "node2"]) as hosts:
        yield from _cluster(request, None, "densenet-slurm2-", hosts)


@pytest.fixture
def workdir(tmp_path):
    """Where jobs are submitted from (their working directory) and write their logs."""
    return tmp_path


def job_info(slurm: LocalSlurm, job_id: int) -> dict[str, str]:
    out = slurm.run("scontrol", "-o", "show", "job", str(job_id)).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def submit(slurm: LocalSlurm, workdir: Path, script: str, sbatch_args: list[str], train_args: list[str],
           env: dict[str, str] | None = None) -> int:
    out = slurm.run(
        "sbatch", "--parsable", f"--chdir={workdir}", f"--output={workdir}/job-%j.out",
        # This cluster has no GPUs; the scripts ask for 8 by default.
        "--gpus-per-node=0", *sbatch_args, str(REPO / "launch" / script), *train_args,
        env=env,
    )
    return int(out.stdout.strip().split(";")[0])


def requeued_then_finished(slurm: LocalSlurm, job_id: int, what: str, explain, after=lambda: None):
    """Waits for the job to requeue itself (``what`` names that wait), calls ``after()`` once its
    nodes are idle, starts it again at once and waits for its end. Returns (the finished job's
    scontrol fields, the time.monotonic() at which the requeue was seen)."""
    def requeued():
        info = job_info(slurm, job_id)
        return info if info.get("Restarts") == "1" and info["JobState"] in ("PENDING", "REQUEUED") else None

    wait_until(requeued, 120, what, explain)
    requeued_at = time.monotonic()
    wait_until(lambda: slurm.node_state() == "idle", 60, "the nodes to be idle again", explain)
    after()
    # A requeued job waits about two minutes before it may start again. Skip most of the wait,
    # but not all: slurmd revokes the old run's credential at the requeue, to the second, and
    # refuses (for good: the job fails) a start within that same second.
    time.sleep(2)
    slurm.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    def ended():
        info = job_info(slurm, job_id)
        return info if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

    return wait_until(ended, 240, "the requeued job to finish", explain), requeued_at


def preempt_and_finish(slurm: LocalSlurm, workdir: Path, job_id: int, run_dir: Path) -> dict:
    """Warns the job once training is under way, lets it requeue and run to the end.
    Returns what happened, for the assertions."""
    log = workdir / f"job-{job_id}.out"

    def explain() -> str:
        return f"job: {job_info(slurm, job_id)}\n{tail(log)}\n{tail(slurm.root / 'slurmctld.log', 15)}"

    wait_until(lambda: last_train_step(read_metrics(run_dir)) >= SIGNAL_AFTER_STEP, 180,
               f"training to pass step {SIGNAL_AFTER_STEP}", explain)
    # What --signal=B:USR1@N does at N seconds before the time limit: USR1 to the batch shell only.
    slurm.run("scancel", "--batch", "--signal=USR1", str(job_id))
    final, _ = requeued_then_finished(slurm, job_id, "the job to requeue itself", explain)
    return {"job": final, "log": log.read_text(errors="replace"), "metrics": read_metrics(run_dir),
            "explain": explain()}


def check_preempted_run(result: dict) -> dict:
    """The assertions both scripts must pass; returns the observations for the report."""
    job, log, metrics, explain = result["job"], result["log"], result["metrics"], result["explain"]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", explain
    assert job["Restarts"] == "1", f"expected exactly one requeue: {job}"

    # The signal reached the batch shell, which passed it on, and the trainer saw SIGUSR1.
    assert "SIGUSR1: the job ends soon" in log, explain
    assert "received SIGUSR1" in log, f"the training processes never got SIGUSR1\n{explain}"

    interrupted = events(metrics, "interrupted")
    assert len(interrupted) == 1, f"expected one interruption, got {interrupted}"
    stop_step = interrupted[0]["step"]
    assert SIGNAL_AFTER_STEP <= stop_step < MAX_STEPS, f"interrupted at step {stop_step}, not mid-run"
    assert "requeueing job" in log and "training stopped after the warning signal" in log, explain

    # The second start resumed from exactly that checkpoint, knowing it was restart 1.
    resumed, after_completion = resumes(metrics, MAX_STEPS)
    assert len(resumed) == 1, f"expected one resume, got {resumed}"
    assert not after_completion, f"a process failed after the run completed and torchrun restarted it: {after_completion}"
    assert resumed[0]["from_step"] == stop_step, f"resumed from {resumed[0]['from_step']}, saved {stop_step}"
    assert resumed[0]["restart_count"] == 1
    assert re.search(r"SLURM_RESTART_COUNT=1\b", log), "the launch script did not log the restart count"
    assert "restart count 1" in log, "the trainer did not log the restart count"

    # No step was trained twice or skipped, and the run ended at --max-steps, without requeueing.
    train_steps = [r["step"] for r in metrics if r.get("kind") == "train"]
    after = train_steps[train_steps.index(stop_step) + 1:]
    assert after and after[0] == stop_step + 1, f"first step after resume: {after[:1]}"
    assert sorted(set(train_steps)) == list(range(1, MAX_STEPS + 1)), "steps missing or repeated"
    assert len(train_steps) == MAX_STEPS, "some step was logged twice"
    assert last_train_step(metrics) == MAX_STEPS
    assert "training finished" in log and "not requeueing" in log, explain
    seen = {"signal": interrupted[0].get("signal"), "checkpoint_step": stop_step,
            "restart_count": resumed[0]["restart_count"], "final_step": last_train_step(metrics)}
    return seen


def test_single_node_script_checkpoints_requeues_and_resumes(slurm, workdir, capsys):
    run_dir = workdir / "run"
    args = [*TINY_TRAINING, "--max-steps", str(MAX_STEPS), "--ckpt-every", str(CKPT_EVERY),
            "--output-dir", str(run_dir)]
    job_id = submit(slurm, workdir, "slurm_single_node.sh", ["--cpus-per-task=2"], args)
    seen = check_preempted_run(preempt_and_finish(slurm, workdir, job_id, run_dir))
    log = (workdir / f"job-{job_id}.out").read_text()
    assert "2 training processes" in log and "on 2 x cpu (torchrun, gloo)" in log
    with capsys.disabled():
        print(f"\nsingle node, job {job_id}: {seen}")


def test_multi_node_script_rendezvous_and_preemption(slurm, workdir, capsys):
    """Two torchrun agents (two SLURM tasks on the one node) meet through the c10d rendezvous the
    script sets up on the first host; the warning reaches both through the signalling step.
    With MAX_RESTARTS=2 torchrun would restart the processes that stopped for the warning; the
    node agents must stop it instead."""
    run_dir = workdir / "run"
    args = [*TINY_TRAINING, "--max-steps", str(MAX_STEPS), "--ckpt-every", str(CKPT_EVERY),
            "--output-dir", str(run_dir)]
    job_id = submit(slurm, workdir, "slurm_multi_node.sh",
                    ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"], args, env={"MAX_RESTARTS": "2"})
    seen = check_preempted_run(preempt_and_finish(slurm, workdir, job_id, run_dir))
    log = (workdir / f"job-{job_id}.out").read_text()
    port = 10000 + job_id % 20000
    assert f"2 torchrun agents on {slurm.node}, rendezvous at {slurm.node}:{port}" in log
    # One process per agent, two agents: the world of 2 exists only if the rendezvous worked.
    assert log.count("1 training processes") == 4, "each agent (two starts x two agents) plans 1 process"
    assert "on 2 x cpu (torchrun, gloo)" in log
    assert len(re.findall(r"SIGUSR1 sent to node agent \d+ \(agent\.\S+\.[01]\.pid\)", log)) == 2, log
    assert log.count("SIGUSR1: passing it on to the training processes") == 2
    assert "signalling step failed" not in log, log  # the warning went through its own srun step
    assert log.count("stopping torchrun before it restarts them") == 2, log
    with capsys.disabled():
        print(f"\nmulti node (2 agents), job {job_id}: {seen}")


def test_cancelled_job_checkpoints_and_stays_cancelled(slurm, workdir, capsys):
    """scancel (like a time limit or a preemption without a warning signal) sends SIGTERM to every
    process of the job. The batch shell must outlive the training so that it can checkpoint, and
    must not requeue a job the user cancelled."""
    run_dir = workdir / "run"
    args = [*TINY_TRAINING, "--max-steps", str(MAX_STEPS), "--ckpt-every", str(CKPT_EVERY),
            "--output-dir", str(run_dir)]
    job_id = submit(slurm, workdir, "slurm_single_node.sh", ["--cpus-per-task=2"], args)
    log_path = workdir / f"job-{job_id}.out"

    def explain() -> str:
        return f"job: {job_info(slurm, job_id)}\n{tail(log_path)}"

    wait_until(lambda: last_train_step(read_metrics(run_dir)) >= SIGNAL_AFTER_STEP, 180,
               f"training to pass step {SIGNAL_AFTER_STEP}", explain)
    slurm.run("scancel", str(job_id))
    job = wait_until(lambda: (i := job_info(slurm, job_id))["JobState"] in ("CANCELLED", "COMPLETED", "FAILED")
                     and i, 120, "the job to end", explain)
    # The batch shell's last words come after the training's; give the log a moment to settle.
    wait_until(lambda: "not requeueing" in log_path.read_text(), 30, "the batch shell's last line", explain)
    log, metrics = log_path.read_text(errors="replace"), read_metrics(run_dir)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", explain()
    assert "SIGTERM: SLURM is ending the job" in log and "training stopped by SLURM's SIGTERM" in log, explain()
    interrupted = events(metrics, "interrupted")
    assert len(interrupted) == 1 and interrupted[0]["signal"] == 15, interrupted
    assert SIGNAL_AFTER_STEP <= interrupted[0]["step"] < MAX_STEPS
    assert not events(metrics, "resumed")
    with capsys.disabled():
        print(f"\nscancel, job {job_id}: checkpoint at step {interrupted[0]['step']} on signal "
              f"{interrupted[0]['signal']}, state {job['JobState']}, restarts {job['Restarts']}")


def saved_at(log: str, step: int) -> bool:
    """Whether the job log says that last.pt was saved at optimizer step ``step``."""
    return re.search(rf"^saved last\.pt.* step {step}\)$", log, re.MULTILINE) is not None


def check_lost_peer_requeue(job: dict, log: str, metrics: list[dict], fault_step: int, explain) -> int:
    """The job requeued itself once on status 5, resumed from a checkpoint saved before the fault
    (at step ``fault_step``) and trained to the end; returns the step it resumed from."""
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", explain()
    assert "another process of the run was lost (status 5" in log and "requeueing job" in log, explain()
    resumed, _ = resumes(metrics, MAX_STEPS)
    assert len(resumed) == 1 and resumed[0]["restart_count"] == 1, resumed
    resumed_from = resumed[0]["from_step"]
    assert CKPT_EVERY <= resumed_from <= fault_step and saved_at(log, resumed_from), (resumed_from, fault_step)
    assert last_train_step(metrics) == MAX_STEPS, explain()
    return resumed_from


def _training_worker(rank: int, job_id: int) -> int | None:
    """The pid of the training process of global rank ``rank`` in job ``job_id``, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if (any(a.endswith(b"train_dist.py") for a in cmdline) and b"DENSENET_EXIT_STATUS_DIR" in environ
                and environ.get(b"RANK") == str(rank).encode() and environ.get(b"SLURM_JOB_ID") == str(job_id).encode()):
            return int(entry.name)
    return None


def test_multi_node_script_requeues_when_a_rank_freezes(slurm, workdir, capsys):
    """A frozen rank (SIGSTOP: a node that hangs, the way a cut-off one does) must not hold the job
    until its time limit: the other rank gives up after --dist-timeout and exits 5, its node agent
    ends with that status rather than torchrun's 1, and the batch script requeues the job, which
    resumes from the last checkpoint and completes."""
    run_dir = workdir / "run"
    timeout_s = 5
    args = [*TINY_TRAINING, "--max-steps", str(MAX_STEPS), "--ckpt-every", str(CKPT_EVERY),
            "--dist-timeout", str(timeout_s), "--output-dir", str(run_dir)]
    job_id = submit(slurm, workdir, "slurm_multi_node.sh",
                    ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"], args)
    log_path = workdir / f"job-{job_id}.out"

    def explain() -> str:
        return f"job: {job_info(slurm, job_id)}\n{tail(log_path)}\n{tail(slurm.root / 'slurmctld.log', 15)}"

    freeze_after = CKPT_EVERY + 10  # a checkpoint exists to resume from
    wait_until(lambda: last_train_step(read_metrics(run_dir)) >= freeze_after, 180,
               f"training to pass step {freeze_after}", explain)
    victim = _training_worker(1, job_id)
    assert victim, f"no training process of rank 1 found for job {job_id}\n{explain()}"
    os.kill(victim, signal.SIGSTOP)
    frozen_at = time.monotonic()
    frozen_step = last_train_step(read_metrics(run_dir))

    def victim_gone():
        assert not pid_alive(victim), f"the frozen training process {victim} outlived its job"

    job, requeued_at = requeued_then_finished(slurm, job_id, "the job to requeue itself after the frozen rank",
                                              explain, after=victim_gone)
    requeued_after = requeued_at - frozen_at
    log = log_path.read_text(errors="replace")
    resumed_from = check_lost_peer_requeue(job, log, read_metrics(run_dir), frozen_step, explain)
    assert "lost contact with the other processes of the run" in log, explain()
    assert "torchrun ended with status 1; the training processes with status 5" in log, explain()
    assert requeued_after < timeout_s + 30, f"requeued {requeued_after:.1f} s after the freeze"
    with capsys.disabled():
        print(f"\nfrozen rank, job {job_id}: frozen at step {frozen_step}, job requeued {requeued_after:.1f} s later "
              f"(--dist-timeout {timeout_s}), resumed from step {resumed_from}, completed at {MAX_STEPS}")


def test_multi_node_script_on_two_hosts_rendezvous_and_preemption(slurm_two_hosts, workdir, capsys):
    """launch/slurm_multi_node.sh on two hosts with their own addresses and names: one agent per
    node, the rendezvous at the first host by name, the warning taken to both hosts by the
    signalling step, the requeue and the resume."""
    slurm = slurm_two_hosts
    run_dir = workdir / "run"
    args = [*TINY_TRAINING, "--max-steps", str(MAX_STEPS), "--ckpt-every", str(CKPT_EVERY),
            "--output-dir", str(run_dir)]
    job_id = submit(slurm, workdir, "slurm_multi_node.sh", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"],
                    args)
    seen = check_preempted_run(preempt_and_finish(slurm, workdir, job_id, run_dir))
    log = (workdir / f"job-{job_id}.out").read_text()
    port = 10000 + job_id % 20000
    assert f"2 torchrun agents on node1 node2, rendezvous at node1:{port}" in log, log
    for node in ("node1", "node2"):  # each start, on each host: one process, its own name
        assert len(re.findall(rf"\[launch [-0-9: ]+ {node}\] 1 training processes on {node}", log)) == 2, log
    assert "on 2 x cpu (torchrun, gloo)" in log
    assert len(re.findall(r"SIGUSR1 sent to node agent \d+ \(agent\.\S+\.[01]\.pid\)", log)) == 2, log
    with capsys.disabled():
        print(f"\nmulti node on two hosts, job {job_id}: {seen}")


def test_multi_node_script_on_two_hosts_requeues_when_a_host_is_cut_off(slurm_two_hosts, workdir, capsys):
    """node2's link goes down mid-run, its processes alive: node1's training gives up after
    --dist-timeout instead of waiting for the job's time limit, and once the link is back (a real
    cluster's SLURM ends the step of a node that stays away itself: SlurmdTimeout) the job step
    ends with status 5 and the batch script requeues the job, which resumes and completes."""
    slurm = slurm_two_hosts
    run_dir = workdir / "run"
    timeout_s = 5
    args = [*TINY_TRAINING, "--max-steps", str(MAX_STEPS), "--ckpt-every", str(CKPT_EVERY),
            "--dist-timeout", str(timeout_s), "--output-dir", str(run_dir)]
    job_id = submit(slurm, workdir, "slurm_multi_node.sh", ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"],
                    args)
    log_path = workdir / f"job-{job_id}.out"

    def explain() -> str:
        return f"job: {job_info(slurm, job_id)}\n{tail(log_path)}\n{tail(slurm.root / 'slurmctld.log', 15)}"

    cut_after = CKPT_EVERY + 10
    wait_until(lambda: last_train_step(read_metrics(run_dir)) >= cut_after, 180,
               f"training to pass step {cut_after}", explain)
    slurm.hosts.cut("node2")
    cut_at = time.monotonic()
    cut_step = last_train_step(read_metrics(run_dir))
    try:
        wait_until(lambda: "lost contact with the other processes of the run" in log_path.read_text(errors="replace"),
                   60, "node1's training to give up on node2", explain)
        noticed_after = time.monotonic() - cut_at
    finally:
        slurm.hosts.restore("node2")
    job, requeued_at = requeued_then_finished(slurm, job_id, "the job to requeue itself", explain)
    requeued_after = requeued_at - cut_at
    resumed_from = check_lost_peer_requeue(job, log_path.read_text(errors="replace"), read_metrics(run_dir),
                                           cut_step, explain)
    assert noticed_after < timeout_s + 25, f"node1 gave up {noticed_after:.1f} s after the cut"
    with capsys.disabled():
        print(f"\nnode2 cut off, job {job_id}: cut at step {cut_step}; node1 gave up {noticed_after:.1f} s later "
              f"(--dist-timeout {timeout_s}); link restored, job requeued {requeued_after:.1f} s after the cut; "
              f"resumed from step {resumed_from}, completed at {MAX_STEPS}")
