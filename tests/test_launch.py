"""The launch machinery without a cluster: submitit parameters (golden), the sbatch script's decisions
(with fake srun / scontrol / sbatch on PATH), rank environments, and the requeue path of StageTask."""

from __future__ import annotations

import functools
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest

from ovr_hpc import dist, launch
from ovr_hpc.config import ConfigError
from tests.test_preflight import inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "slurm", "coldstart.sh")
TINY = os.path.join(REPO, "configs", "tiny", "coldstart.yaml")


# ----------------------------------------------------------------------------- times and parameters


@pytest.mark.parametrize("value, minutes", [
    (90, 90), (1.5, 2), ("45", 45), ("30:30", 31), ("2:00:00", 120), ("1-12", 2160),
    ("1-00:30", 1470), ("2-00:00:00", 2880), ("0:00:10", 1),
])
def test_parse_time_minutes(value, minutes):
    assert launch.parse_time_minutes(value) == minutes


@pytest.mark.parametrize("value", ["", "abc", "1:2:3:4", "-5", 0])
def test_parse_time_minutes_rejects(value):
    with pytest.raises(ValueError):
        launch.parse_time_minutes(value)


def test_executor_parameters_golden():
    params = launch.executor_parameters("coldstart", nodes=4, gpus_per_node=8, cpus_per_task=12, mem_gb=480,
                                        partition="gpu", time="2-00:00:00", slurm_params={"account": "proj"})
    assert params == {
        "name": "ovr-coldstart",
        "nodes": 4,
        "tasks_per_node": 8,
        "gpus_per_node": 8,
        "cpus_per_task": 12,
        "slurm_mem": "480G",
        "timeout_min": 2880,
        "slurm_partition": "gpu",
        "slurm_signal_delay_s": 600,
        "slurm_additional_parameters": {"requeue": True},
        "slurm_srun_args": ["--kill-on-bad-exit=0", "--wait=300"],
        "slurm_setup": ["export SRUN_CPUS_PER_TASK=12"],
        "slurm_account": "proj",
    }


def test_executor_parameters_cpu_ranks_and_checks():
    params = launch.executor_parameters("coldstart", gpus_per_node=0, tasks_per_node=2, time=30, signal_delay_s=60)
    assert params["tasks_per_node"] == 2 and "gpus_per_node" not in params
    assert launch.executor_parameters("coldstart", gpus_per_node=0, time=30, signal_delay_s=60)["tasks_per_node"] == 1
    with pytest.raises(ValueError, match="--signal-delay-s"):
        launch.executor_parameters("coldstart", time=5)  # the default 600 s warning would come at once
    with pytest.raises(ValueError, match="--nodes"):
        launch.executor_parameters("coldstart", nodes=0)


@pytest.fixture
def fake_srun(monkeypatch):
    """submitit's Slurm executor refuses to exist without srun on PATH."""
    from submitit.slurm import slurm

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))


def test_sbatch_file_submitit_writes_golden(tmp_path, fake_srun):
    executor = launch.make_executor(str(tmp_path / "%j"), "slurm", max_requeues=7, stage="coldstart", nodes=2,
                                    gpus_per_node=8, cpus_per_task=10, partition="gpu", time="4:00:00")
    assert executor._executor.max_num_timeout == 7
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")
    folder = str(tmp_path)
    assert text.replace(folder, "FOLDER") == textwrap.dedent("""\
        #!/bin/bash

        # Parameters
        #SBATCH --cpus-per-task=10
        #SBATCH --error=FOLDER/%j/%j_0_log.err
        #SBATCH --gpus-per-node=8
        #SBATCH --job-name=ovr-coldstart
        #SBATCH --mem=0
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=8
        #SBATCH --open-mode=append
        #SBATCH --output=FOLDER/%j/%j_0_log.out
        #SBATCH --partition=gpu
        #SBATCH --requeue
        #SBATCH --signal=USR2@600
        #SBATCH --time=240
        #SBATCH --wckey=submitit

        # setup
        export SRUN_CPUS_PER_TASK=10

        # command
        export SUBMITIT_EXECUTOR=slurm
        srun --unbuffered --output FOLDER/%j/%j_%t_log.out --error FOLDER/%j/%j_%t_log.err \
--kill-on-bad-exit=0 --wait=300 python -u -m submitit.core._submit FOLDER
        """)


def test_local_executor_drops_slurm_parameters(tmp_path):
    executor = launch.make_executor(str(tmp_path), "local", stage="coldstart", gpus_per_node=0, tasks_per_node=2,
                                    time=30, signal_delay_s=60)
    assert executor.cluster == "local"
    assert executor.parameters["tasks_per_node"] == 2
    assert not any(k.startswith("slurm") for k in executor.parameters)
    with pytest.raises(ValueError, match="--nodes"):
        launch.make_executor(str(tmp_path), "local", stage="coldstart", nodes=2, gpus_per_node=0, time=30,
                             signal_delay_s=60)
    with pytest.raises(ValueError, match="--cluster"):
        launch.make_executor(str(tmp_path), "kubernetes", stage="coldstart")


def test_submit_rejects_bad_config_before_anything_is_submitted(monkeypatch, tmp_path):
    def no_executor(*a, **k):
        raise AssertionError("an executor was built for a bad config")

    monkeypatch.setattr(launch, "make_executor", no_executor)
    with pytest.raises(ConfigError, match=r"parallel.zero_stage \(5\) must be 1, 2 or 3"):
        launch.submit("coldstart", TINY, ["parallel.zero_stage=5"])
    # checks that need the world size: 3 nodes x 1 rank cannot split a global batch of 8
    with pytest.raises(ConfigError, match="global_batch_size"):
        launch.submit("coldstart", TINY, inputs(tmp_path), nodes=3, gpus_per_node=1)
    # and the model and data it names (every preflight check)
    with pytest.raises(ConfigError, match="model.path = 'runs/tiny/model' does not exist"):
        launch.submit("coldstart", TINY, nodes=1, gpus_per_node=8)
    with pytest.raises(ConfigError, match=r"3 ranks per node \(--tasks-per-node\) but 2 GPUs per node"):
        launch.submit("coldstart", TINY, inputs(tmp_path), nodes=1, gpus_per_node=2, tasks_per_node=3)
    with pytest.raises(ConfigError, match="unknown stage"):
        launch.submit("pretrain", TINY)


def test_cli_reports_config_errors(capsys):
    assert launch.cli_main(["coldstart", TINY, "optimizer.lr=-1", "--cluster", "local", "--gpus-per-node", "0"]) == 2
    assert "ovr-hpc: config error: optimizer.lr (-1.0) must be > 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- rank environments


def test_slurm_step_env_gives_ranks_and_the_scripts_rendezvous():
    # what a task of `srun` in slurm/common.sh sees: SLURM_* from srun, MASTER_* exported by the script
    env = {
        "SLURM_JOB_ID": "123457", "SLURM_STEP_ID": "0", "SLURM_PROCID": "13", "SLURM_LOCALID": "5",
        "SLURM_NTASKS": "16", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123457 % 40000),
    }
    info = dist.detect_rank_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (13, 16, 5, 8)
    assert (info.master_addr, info.master_port, info.launcher) == ("gpu07", 23457, "slurm")
    # the batch script itself is not a rank
    batch = {k: v for k, v in env.items() if k != "SLURM_STEP_ID"}
    assert dist.detect_rank_info(batch).launcher == "single"


def test_rendezvous_of_the_script_matches_dist(tmp_path):
    fake_bin = _fake_bin(tmp_path)
    out = subprocess.run(
        ["bash", "-c", f". {REPO}/slurm/common.sh && ovr_export_rendezvous && echo $MASTER_ADDR $MASTER_PORT"],
        env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "987654",
             "SLURM_JOB_NODELIST": "gpu[07-08]"},
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out == ["gpu07", str(dist.slurm_master_port(987654))]


def test_export_rank_env_local(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", *launch.RUNTIME_ENV_DEFAULTS):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")  # the user's value wins
    exported = launch.export_rank_env("local", rank=1, local_rank=1, world_size=2, num_nodes=1, job_id="4242")
    assert exported["RANK"] == "1" and exported["MASTER_PORT"] == str(dist.slurm_master_port(4242))
    assert "NCCL_DEBUG" not in exported and os.environ["NCCL_DEBUG"] == "INFO"
    info = dist.detect_rank_info()
    assert (info.rank, info.world_size, info.local_rank, info.master_addr) == (1, 2, 1, "127.0.0.1")


def test_export_rank_env_slurm_leaves_ranks_to_dist(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    # inherited from the submitting process (a torchrun worker, a notebook that ran torch.distributed)
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)
    slurm_task = dict(SLURM_PROCID="3", SLURM_STEP_ID="0", SLURM_NTASKS="4", SLURM_LOCALID="1",
                      SLURM_STEP_NUM_NODES="2", SLURM_STEP_NODELIST="gpu[07-08]", SLURM_JOB_ID="77")
    for key, value in slurm_task.items():
        monkeypatch.setenv(key, value)
    exported = launch.export_rank_env("slurm", rank=3, local_rank=1, world_size=4, num_nodes=2, job_id="77")
    assert "RANK" not in exported and exported["OMP_NUM_THREADS"] == "6"
    info = dist.detect_rank_info()
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 4, 1, "slurm")
    assert (info.master_addr, info.master_port) == ("gpu07", dist.slurm_master_port(77))


def test_sbatch_script_drops_inherited_rank_variables(tmp_path):
    """The sbatch script's rendezvous function, run under bash with a leaked torchrun environment."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho gpu07\necho gpu08\n")
    (fake_bin / "scontrol").chmod(0o755)
    script = (f"source {os.path.join(REPO, 'slurm', 'common.sh')}; ovr_export_rendezvous; "
              "echo \"${RANK-unset} ${WORLD_SIZE-unset} ${LOCAL_RANK-unset} $MASTER_ADDR $MASTER_PORT\"")
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="77")
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["unset", "unset", "unset", "gpu07", str(dist.slurm_master_port(77))]


def test_runtime_defaults_match_the_sbatch_script():
    text = open(os.path.join(REPO, "slurm", "common.sh")).read()
    in_script = dict(re.findall(r'export (\w+)="\$\{\1:-([^}]*)\}"', text))
    in_script.update(re.findall(r"export (PYTHONUNBUFFERED)=(\S+)", text))
    assert {k: in_script.get(k) for k in launch.RUNTIME_ENV_DEFAULTS} == launch.RUNTIME_ENV_DEFAULTS


# ----------------------------------------------------------------------------- StageTask's requeue path


class FakePaths:
    def __init__(self, folder):
        self.submitted_pickle = folder / "7_submitted.pkl"


class FakeEnv:
    def __init__(self, folder, cluster="local", rank=0):
        self.cluster, self.global_rank, self.job_id = cluster, rank, "7"
        self.paths = FakePaths(folder)
        self.requeued = []

    def _requeue(self, countdown):
        self.requeued.append(countdown)


def _dump_submission(folder, countdown):
    from submitit.core.utils import DelayedSubmission

    task = launch.StageTask("coldstart", TINY, ["seed=3"])
    delayed = DelayedSubmission(task)
    delayed.set_timeout(30, countdown)
    delayed.dump(folder / "7_submitted.pkl")
    return task


def test_stage_task_requeues_after_the_save(tmp_path):
    from submitit.core.utils import DelayedSubmission

    task = _dump_submission(tmp_path, countdown=5)
    env = FakeEnv(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        task._requeue(env)
    assert exit_info.value.code == dist.EXIT_REQUEUE and env.requeued == [4]
    next_run = DelayedSubmission.load(env.paths.submitted_pickle)
    assert (next_run._timeout_min, next_run._timeout_countdown) == (30, 4)
    assert repr(next_run.function) == repr(task) and not next_run.done()


def test_stage_task_requeue_cap_and_other_ranks(tmp_path):
    from submitit.core.utils import UncompletedJobError

    task = _dump_submission(tmp_path, countdown=0)
    with pytest.raises(UncompletedJobError, match="max_requeues"):
        task._requeue(FakeEnv(tmp_path))
    other = FakeEnv(tmp_path, rank=1)  # only rank 0 requeues; the others just exit without a result
    with pytest.raises(SystemExit):
        task._requeue(other)
    assert other.requeued == []


def test_stage_task_leaves_jobs_slurm_is_ending_to_slurm(tmp_path, monkeypatch):
    task = _dump_submission(tmp_path, countdown=5)
    monkeypatch.setattr(launch, "slurm_job_state", lambda job_id: "COMPLETING")
    env = FakeEnv(tmp_path, cluster="slurm")
    with pytest.raises(SystemExit):
        task._requeue(env)
    assert env.requeued == []
    assert launch.requeue_refusal("slurm", "7", state="RUNNING") is None
    assert "CANCELLED" in launch.requeue_refusal("slurm", "7", state="CANCELLED")
    assert launch.requeue_refusal("local", "7") is None


def test_stage_task_pickles_and_checkpoints():
    import cloudpickle

    task = launch.StageTask("coldstart", TINY, ["seed=1"])
    again = cloudpickle.loads(cloudpickle.dumps(task))
    assert repr(again) == repr(task)
    nxt = task.checkpoint()
    assert repr(nxt.function) == repr(task) and nxt.args == () and nxt.function is not task


# ----------------------------------------------------------------------------- the sbatch script, faked Slurm


def _fake_bin(tmp_path):
    """srun, scontrol and sbatch stand-ins that log their calls to $FAKE_LOG."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    scripts = {
        "srun": """
            echo "srun $*" >> "$FAKE_LOG"
            echo "env MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS \
SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-} NCCL_DEBUG=$NCCL_DEBUG" >> "$FAKE_LOG"
            exit "${FAKE_SRUN_RC:-0}"
        """,
        "scontrol": """
            case "$1 $2" in
              "show hostnames") echo "${2:+}gpu07"; echo gpu08 ;;
              "show job") echo "JobId=$4 JobState=${FAKE_JOB_STATE:-RUNNING} Command=${FAKE_COMMAND:-}" ;;
              requeue*) echo "requeue $2" >> "$FAKE_LOG" ;;
            esac
        """,
        "sbatch": """
            echo "sbatch $*" >> "$FAKE_LOG"
            echo "Submitted batch job 42"
        """,
    }
    for name, body in scripts.items():
        path = fake / name
        path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return fake


def tiny_tree(root) -> str:
    """A folder holding what the tiny configs name (runs/tiny/...), as stand-ins the checks accept."""
    from tests.test_preflight import fake_data, fake_model

    tiny = os.path.join(str(root), "work", "runs", "tiny")
    os.makedirs(os.path.join(tiny, "data"), exist_ok=True)
    fake_model(tiny, "model")
    fake_model(tiny, "coldstart_model")
    for name, kind in (("coldstart", "sft"), ("heldout", "rl"), ("rl", "rl")):
        os.replace(fake_data(os.path.join(tiny, "data"), kind), os.path.join(tiny, "data", f"{name}.jsonl"))
    return os.path.join(str(root), "work")


def run_script(tmp_path, args, job=True, script=SCRIPT, **env_overrides):
    """The script run from a folder holding the tiny configs' model and data (stand-ins)."""
    fake = _fake_bin(tmp_path)
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "OVR_")) and k not in ("OMP_NUM_THREADS", "NCCL_DEBUG")}
    env.update(PATH=f"{fake}:{env['PATH']}", FAKE_LOG=str(log), OVR_PYTHON=sys.executable)
    if job:
        env.update(SLURM_JOB_ID="5001", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="8",
                   SLURM_NTASKS_PER_NODE="4", SLURM_CPUS_PER_TASK="12", SLURM_GPUS_ON_NODE="8",
                   SLURM_SUBMIT_DIR=REPO)
    env.update({k: str(v) for k, v in env_overrides.items()})
    proc = subprocess.run(["bash", script, *args], cwd=tiny_tree(tmp_path), env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, log.read_text()


def test_sbatch_header_defaults():
    directives = [line.split()[1] for line in open(SCRIPT) if line.startswith("#SBATCH")]
    assert directives == [
        "--job-name=ovr-coldstart", "--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8",
        "--mem=0", "--time=24:00:00", "--signal=USR1@600", "--requeue", "--open-mode=append",
        "--output=logs/%x-%j.out",
    ]


def test_job_runs_one_srun_and_prints_the_header(tmp_path):
    proc, calls = run_script(tmp_path, [TINY, "optimizer.lr=1e-4"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for expected in ("coldstart: job 5001, run 1", "nodes     2: gpu[07-08]", "tasks     8 (4 per node), 12 CPUs",
                     "gpus      8 per node", "master    gpu07:25001", "commit    ", "lr: 0.0001", "coldstart finished"):
        assert expected in out, (expected, out)
    srun = [line for line in calls.splitlines() if line.startswith("srun")]
    assert srun == [f"srun --kill-on-bad-exit=0 --wait=300 {sys.executable} -m ovr_hpc.cli coldstart {TINY} "
                    "optimizer.lr=1e-4"]
    assert "env MASTER_ADDR=gpu07 MASTER_PORT=25001 OMP_NUM_THREADS=12 SRUN_CPUS_PER_TASK=12 NCCL_DEBUG=WARN" in calls
    assert "requeue" not in calls


def test_job_requeues_itself_after_a_save(tmp_path):
    proc, calls = run_script(tmp_path, [TINY], FAKE_SRUN_RC=75, SLURM_RESTART_COUNT=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "requeue 5001" in calls
    assert "requeueing the job (requeue 3 of at most 20)" in proc.stdout


@pytest.mark.parametrize("env, message", [
    ({"FAKE_JOB_STATE": "COMPLETING"}, "the job is COMPLETING"),  # scancel / scontrol requeue / time limit
    ({"SLURM_RESTART_COUNT": 3, "OVR_MAX_REQUEUES": 3}, "requeued 3 times already"),
])
def test_job_does_not_requeue(tmp_path, env, message):
    proc, calls = run_script(tmp_path, [TINY], FAKE_SRUN_RC=75, **env)
    assert proc.returncode == dist.EXIT_REQUEUE
    assert message in proc.stdout and "requeue 5001" not in calls


def test_job_failure_is_not_requeued(tmp_path):
    proc, calls = run_script(tmp_path, [TINY], FAKE_SRUN_RC=1)
    assert proc.returncode == 1 and "failed (srun exit 1)" in proc.stdout and "requeue" not in calls


@pytest.mark.parametrize("override, message", [
    ("parallel.zero_stage=5", "parallel.zero_stage (5) must be 1, 2 or 3"),
    ("parallel.global_batch_size=12", "parallel.global_batch_size (12) must be divisible by data-parallel size (8)"),
])
def test_job_with_a_bad_config_starts_nothing(tmp_path, override, message):
    proc, calls = run_script(tmp_path, [TINY, override])
    assert proc.returncode == 2
    assert f"ovr-hpc: config error: {message}" in proc.stderr
    assert "nothing was started" in proc.stdout and "srun" not in calls


def test_login_node_run_checks_then_submits(tmp_path):
    batch = "parallel.global_batch_size=32"   # 4 nodes x the script's 8 tasks: 32 ranks
    proc, calls = run_script(tmp_path, ["-N", "4", "--time", "1:00:00", "--", TINY, "seed=1", batch], job=False)
    assert proc.returncode == 0, proc.stderr
    assert calls.strip() == f"sbatch -N 4 --time 1:00:00 {SCRIPT} {TINY} seed=1 {batch}"
    proc, calls = run_script(tmp_path, [TINY, "seed=1"], job=False)
    assert calls.strip() == f"sbatch {SCRIPT} {TINY} seed=1"
    proc, calls = run_script(tmp_path, [TINY, "schedule.kind=step"], job=False)
    assert proc.returncode == 2 and "config error: schedule.kind" in proc.stderr and calls == ""


@pytest.mark.parametrize("stage, signal_s", [("rl", 1800), ("eval", 300)])
def test_later_stages_share_the_machinery(tmp_path, stage, signal_s):
    script = os.path.join(REPO, "slurm", f"{stage}.sh")
    directives = [line.split()[1] for line in open(script) if line.startswith("#SBATCH")]
    assert f"--job-name=ovr-{stage}" in directives and f"--signal=USR1@{signal_s}" in directives
    assert {"--requeue", "--open-mode=append", "--output=logs/%x-%j.out", "--gpus-per-node=8"} <= set(directives)
    config = os.path.join(REPO, "configs", "tiny", f"{stage}.yaml")
    proc, calls = run_script(tmp_path, [config], script=script, FAKE_SRUN_RC=75)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"-m ovr_hpc.cli {stage} {config}" in calls and "requeue 5001" in calls


def test_scripts_parse():
    for path in ("slurm/common.sh", "slurm/coldstart.sh", "slurm/rl.sh", "slurm/eval.sh", "scripts/local-slurm/start.sh",
                 "scripts/local-slurm/stop.sh"):
        subprocess.run(["bash", "-n", os.path.join(REPO, path)], check=True)


# ----------------------------------------------------------------------------- cluster="local"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_submit_local_runs_several_processes(tmp_path, tiny_model_dir):
    from ovr_hpc.data.synthetic import write_coldstart_sft

    data = write_coldstart_sft(str(tmp_path / "data.jsonl"), 200, seed=0)
    out = tmp_path / "run"
    job = launch.submit(
        "coldstart", TINY,
        [f"model.path={tiny_model_dir}", f"data.train_files=[{data}]", f"checkpoint.output_dir={out}",
         "logging.progress_bar=false", "logging.tensorboard=false", "schedule.max_steps=4"],
        cluster="local", gpus_per_node=0, tasks_per_node=2, time=10, signal_delay_s=60,
        folder=str(tmp_path / "submitit"),
    )
    results = job.results()
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert os.path.exists(out / "checkpoints" / "latest" / "COMPLETE")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


# ----------------------------------------------------------------------------- what reaches the queue runs


def test_login_node_checks_the_jobs_ranks(tmp_path):
    """The 7B recipe's global batch of 640 on 3 nodes (24 ranks) never reaches the queue."""
    proc, calls = run_script(tmp_path, ["--nodes=3", "--", TINY, "parallel.global_batch_size=640"], job=False)
    assert proc.returncode == 2 and calls == ""
    assert ("parallel.global_batch_size (640) must be divisible by data-parallel size (24) x "
            "parallel.micro_batch_size (1) = 24, for the job's 24 ranks (3 nodes x 8 ranks); node counts that work "
            "with 8 ranks per node: 1, 2, 4, 5, 8, 10") in proc.stderr


@pytest.mark.parametrize("job", [False, True], ids=["login_node", "in_job"])
def test_fewer_gpus_than_tasks_per_node_is_refused(tmp_path, job):
    if job:
        proc, calls = run_script(tmp_path, [TINY], SLURM_NTASKS_PER_NODE=8, SLURM_GPUS_ON_NODE=4, SLURM_NTASKS=8)
    else:
        proc, calls = run_script(tmp_path, ["--gpus-per-node=4", "--", TINY], job=False)
    assert proc.returncode == 2 and "srun" not in calls and "sbatch" not in calls
    assert ("8 ranks per node (--ntasks-per-node) but 4 GPUs per node (--gpus-per-node): ranks would share a GPU. "
            "Give --ntasks-per-node=4 together with --gpus-per-node=4") in proc.stderr
    if not job:   # both lowered: fine
        proc, calls = run_script(tmp_path, ["--gpus-per-node=4", "--ntasks-per-node=4", "--", TINY], job=False)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("job, hint", [
    (False, "'--nodes=2' is not a config: sbatch options go before '--', e.g. slurm/coldstart.sh --nodes=2 -- CONFIG"),
    (True, "'--nodes=2' is not a config: sbatch options go before the script, sbatch --nodes=2 slurm/coldstart.sh "
           "CONFIG"),
])
def test_sbatch_options_in_the_wrong_place_get_a_hint(tmp_path, job, hint):
    proc, calls = run_script(tmp_path, ["--nodes=2", TINY], job=job)
    assert proc.returncode == 2 and hint in proc.stderr and calls == ""


def test_submit_help_lists_every_resource_flag(capsys):
    from ovr_hpc.cli import main

    with pytest.raises(SystemExit) as e:
        main(["submit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--nodes", "--gpus-per-node", "--tasks-per-node", "--cpus-per-task", "--mem", "--partition",
                 "--time", "--account", "--qos", "--constraint", "--signal-delay-s"):
        assert flag in out, flag
    assert "h100:8" in out


def test_submitit_job_asks_for_what_the_sbatch_scripts_do(tmp_path, fake_srun):
    """CPUs per task and all of the node's memory by default; typed GPUs, constraint and account passed on."""
    executor = launch.make_executor(str(tmp_path), "slurm", stage="rl", nodes=8, gpus_per_node="h100:8",
                                    constraint="h100&ib", account="proj", qos="high", time="3-00:00:00")
    text = executor._executor._make_submission_file_text("CMD", "uid")
    for line in ("#SBATCH --cpus-per-task=8", "#SBATCH --mem=0", "#SBATCH --gpus-per-node=h100:8",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --constraint='h100&ib'", "#SBATCH --account=proj",
                 "#SBATCH --qos=high", "export SRUN_CPUS_PER_TASK=8"):
        assert line in text.splitlines(), (line, text)
    assert text.count("--gpus-per-node") == 1


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes (0) must be >= 1"),
    (["--time", "5"], "--signal-delay-s (600) must be shorter than --time (300 s)"),
    (["--gpus-per-node", "h100"], "--gpus-per-node (h100): expected a count or TYPE:COUNT"),
    (["--mem", "lots"], "--mem (lots): expected Slurm's syntax"),
])
def test_submit_errors_name_the_flag(capsys, args, message):
    assert launch.cli_main(["coldstart", TINY, *args]) == 2
    assert f"ovr-hpc submit: {message}" in capsys.readouterr().err


def test_no_literal_percent_j_folder(tmp_path, monkeypatch):
    """The default folder is flat (submitit names the files by job id): a `%j` in it would stay behind as a
    literal folder, which submitit makes before the job id is known."""
    assert "%j" not in launch.DEFAULT_FOLDER
    overrides = inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "StageTask", lambda *a: functools.partial(str, "done"))   # no training
    job = launch.submit("coldstart", TINY, overrides, cluster="local", gpus_per_node=0, time=10, signal_delay_s=60)
    assert job.result() == "done"
    names = os.listdir(tmp_path / "logs" / "submitit")
    assert names and all(name.startswith(str(job.job_id)) for name in names), names
