"""A single-node Slurm on this machine, for trying and testing the sweep's Slurm scripts (a tool,
not part of the paper). Needs root and Debian's packages: apt-get install slurm-wlm munge.

    python tools/localslurm.py start /tmp/slurm   # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
    SLURM_CONF=/tmp/slurm/slurm.conf sbatch ...    # sinfo, squeue, scancel, scontrol alike
    python tools/localslurm.py stop /tmp/slurm     # cancels its jobs, stops its daemons by PID

Everything lives in the one folder: slurm.conf, the controller's state, the logs, a munge daemon
of its own (its socket too), and pids.json, the daemons `stop` ends. Nothing under /etc or /run
is touched and the ports are picked free, so it runs beside any other Slurm or munge on the
machine. The node is this machine with all its cores and no GPU (no GRES), one partition
`debug`, no accounting; finished jobs are listed in jobcomp.txt (state and exit code).
"""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runsafe.errors import Parser, RunError, run_cli  # noqa: E402  (one-line errors, as train.py's)

DAEMONS = ("munged", "slurmctld", "slurmd")  # started in this order, stopped in reverse
NEEDED = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "squeue", "scancel",
          "sinfo")


def find(program):
    """The path of a program of the packages (some live in sbin, often not on a user's PATH)."""
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if path is None:
        raise RunError(f"{program} not found: install Slurm with apt-get install slurm-wlm munge")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def memory_mb():
    """Most of this machine's memory, in MB: a node claiming more than it has is drained."""
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return int(total_kb / 1024 * 0.9)


def slurm_conf(folder, host):
    """The configuration: one node (this machine), one partition, paths all inside `folder`."""
    settings = {
        "ClusterName": "local", "SlurmctldHost": host, "SlurmUser": "root",
        "SlurmctldPort": free_port(), "SlurmdPort": free_port(),
        "AuthType": "auth/munge", "CredType": "cred/munge",
        "AuthInfo": f"socket={folder}/munge/munge.socket",
        "MpiDefault": "none", "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core",
        # no cgroups: track a job's processes by their parent, bind no CPU
        "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
        "ReturnToService": 2,
        "StateSaveLocation": f"{folder}/state", "SlurmdSpoolDir": f"{folder}/spool",
        "SlurmctldPidFile": f"{folder}/slurmctld.pid", "SlurmdPidFile": f"{folder}/slurmd.pid",
        "SlurmctldLogFile": f"{folder}/slurmctld.log", "SlurmdLogFile": f"{folder}/slurmd.log",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/filetxt", "JobCompLoc": f"{folder}/jobcomp.txt",
        # after a plain scancel, the time a job has to checkpoint before it is killed: more than
        # the default 30 s, for a loaded test machine
        "KillWait": 60,
    }
    lines = [f"{k}={v}" for k, v in settings.items()]
    lines += [f"NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb()} State=UNKNOWN",
              "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"]
    return "\n".join(lines) + "\n"


def environment(folder):
    """os.environ with SLURM_CONF pointing at the folder's slurm.conf."""
    return dict(os.environ, SLURM_CONF=os.path.join(folder, "slurm.conf"))


def wait_for(what, check, timeout):
    """Polls check() until it returns true, or raises a RunError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RunError(f"{what} did not happen within {timeout} s")


def start_munge(folder, pids):
    """munged as user munge, with its socket, seed, pid and log files in folder/munge."""
    home = os.path.join(folder, "munge")
    os.makedirs(home)
    os.chmod(home, 0o755)  # munged wants its socket's folder reachable by all, writable by it
    user = pwd.getpwnam("munge")
    os.chown(home, user.pw_uid, user.pw_gid)
    socket_path = os.path.join(home, "munge.socket")
    pids["munged"] = spawn(folder, "munged", [
        find("munged"), "--foreground", f"--socket={socket_path}",
        f"--pid-file={home}/munged.pid", f"--seed-file={home}/munged.seed",
        f"--log-file={home}/munged.log"], user="munge", group="munge")

    def answers():  # a credential made and checked on the socket: munge -n | unmunge
        made = subprocess.run([find("munge"), "-n", "-S", socket_path], capture_output=True)
        check = subprocess.run([find("unmunge"), "-S", socket_path], input=made.stdout,
                               capture_output=True)
        return made.returncode == 0 and check.returncode == 0
    wait_for("munged answering on its socket", answers, 30)


def spawn(folder, name, command, **kwargs):
    """Starts a daemon in the foreground of its own session, its output in folder/NAME.out;
    returns its PID."""
    with open(os.path.join(folder, f"{name}.out"), "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   env=environment(folder), **kwargs)
    time.sleep(0.5)
    if process.poll() is not None:
        raise RunError(f"{name} exited at once with status {process.returncode}: see "
                       f"{folder}/{name}.out and {folder}/{name}.log")
    return process.pid


def node_state(folder):
    run = subprocess.run([find("sinfo"), "--noheader", "--format=%T"], capture_output=True,
                         text=True, env=environment(folder))
    return run.stdout.strip()


def start(folder):
    """Brings up munged, slurmctld and slurmd with everything in `folder` (made here, must not
    exist); returns once the node is idle. Their PIDs go to folder/pids.json."""
    if os.geteuid() != 0:
        raise RunError("needs root: the daemons run as root, and munged as user munge")
    for program in NEEDED:
        find(program)
    try:
        pwd.getpwnam("munge")
    except KeyError:
        raise RunError("no user munge: install munge with apt-get install munge") from None
    folder = os.path.abspath(folder)
    above = os.path.dirname(folder)
    while above != os.path.dirname(above):  # munged, as user munge, must reach its socket
        if os.path.exists(above) and not os.stat(above).st_mode & 0o001:
            raise RunError(f"{above} is closed to other users: munged (as user munge) could not "
                           f"reach its socket in {folder}; choose a folder elsewhere")
        above = os.path.dirname(above)
    try:
        os.makedirs(folder)
    except OSError as e:
        raise RunError(f"{folder}: cannot create it ({e.strerror or e})") from None
    os.chmod(folder, 0o755)
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(folder, sub))
    host = socket.gethostname().split(".")[0]
    with open(os.path.join(folder, "slurm.conf"), "w") as f:
        f.write(slurm_conf(folder, host))
    pids = {}
    try:
        start_munge(folder, pids)
        conf = os.path.join(folder, "slurm.conf")
        pids["slurmctld"] = spawn(folder, "slurmctld", [find("slurmctld"), "-D", "-i", "-f", conf])
        pids["slurmd"] = spawn(folder, "slurmd", [find("slurmd"), "-D", "-N", host, "-f", conf])
        wait_for("the node becoming idle (sinfo)", lambda: node_state(folder) == "idle", 60)
    finally:
        with open(os.path.join(folder, "pids.json"), "w") as f:
            json.dump(pids, f)
    return folder


def alive(pid):
    """True while `pid` runs (a zombie child of this process is reaped, and is gone)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child: look it up
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def is_daemon(pid, name):
    """The process `pid` still runs the program `name` (not a later process with its PID)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0")[0].decode()) == name
    except OSError:
        return False


def stop(folder):
    """Cancels the cluster's jobs, then stops the daemons that `start` recorded, by PID: SIGTERM,
    and SIGKILL after 20 s. Returns the names of those that were still running."""
    with open(os.path.join(folder, "pids.json")) as f:
        pids = json.load(f)
    if pids.get("slurmctld") and alive(pids["slurmctld"]):
        subprocess.run([find("scancel"), "--full", "--partition=debug"], capture_output=True,
                       env=environment(folder), timeout=30)

        def no_jobs():
            return not subprocess.run([find("squeue"), "--noheader"], capture_output=True,
                                      text=True, env=environment(folder)).stdout.strip()
        try:
            wait_for("the jobs ending", no_jobs, 40)
        except RunError:
            pass  # their processes end with slurmd's
    stopped = []
    for name in reversed(DAEMONS):
        pid = pids.get(name)
        if not pid or not alive(pid) or not is_daemon(pid, name):
            continue
        os.kill(pid, signal.SIGTERM)
        try:
            wait_for(f"{name} ending", lambda: not alive(pid), 20)
        except RunError:
            os.kill(pid, signal.SIGKILL)
        stopped.append(name)
    return stopped


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["start", "stop"])
    p.add_argument("folder", help="start: a new folder for the cluster; stop: that folder")
    args = p.parse_args(argv)
    if args.command == "start":
        folder = start(args.folder)
        print(f"export SLURM_CONF={os.path.join(folder, 'slurm.conf')}")
    else:
        if not os.path.isfile(os.path.join(args.folder, "pids.json")):
            raise RunError(f"{args.folder}: no pids.json, so not a cluster this tool started")
        print(f"stopped {', '.join(stop(args.folder)) or 'nothing (all had ended)'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "localslurm.py"))
