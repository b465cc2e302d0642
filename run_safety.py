"""run_safety.py: what makes a training run safe to stop, rerun and share a folder (README "Runs you cannot lose").

Nothing here is part of the method; train.py's loop calls it at a few named points:

  output_folder(...)   one run per --output_dir (a lock file holding "pid host"); a folder this run created and left
                       empty (a bad input) is removed again
  Interrupts           Ctrl-C / SIGTERM are noted and acted on at the end of the step (save, then exit 130 / 143)
  agree_at_step_end    the step's one host synchronisation: every process saves or stops at the same step
  together(...)        a bad input met by any process stops all of them, printed once
  save_atomic          a checkpoint is always the old file or the new one, never half of one
  check_resume         a folder written by another run (model, method, teacher, recipe) is refused, naming the keys
  cli(main)            every user error ends with one line `error: ...` and exit code 2; under torchrun, a process
                       with nothing to say waits for the one that says it
"""
import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

LOCK = "run.lock"


# torchrun stops every process as soon as one of them ends with an error: a process that has nothing to print waits
# this long, so that the one printing the line the user needs is not stopped before it has printed it
QUIET_WAIT_S = 10


class Stop(Exception):
    """End the run with exit code `code`; what there was to say has been printed, by this process or (quiet=True)
    by another one."""

    def __init__(self, code, quiet=False):
        super().__init__(code)
        self.code = code
        self.quiet = quiet


def is_rank0():
    return int(os.environ.get("RANK", 0)) == 0


def cli(main):
    """Run main(). A bad input (ValueError, FileNotFoundError) or a non-finite loss ends with one line `error: ...`
    on stderr and exit code 2; an interrupt exits 130 (SIGINT) / 143 (SIGTERM).

    Under torchrun every process parses the same flags and meets the same bad input before the processes talk to each
    other: rank 0 prints it. Errors met later are printed by the process that met them (see together()). A process
    that leaves the printing to another waits QUIET_WAIT_S before it exits (torchrun ends the wait once the printer
    exits)."""
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        started = dist.is_available() and dist.is_initialized()
        if not (is_rank0() or started or getattr(e, "first_to_meet_it", False)):
            wait_for_the_printer()  # rank 0 meets it too and prints it; if it did not, this process goes on to say it
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except Stop as e:
        if e.quiet:
            wait_for_the_printer()
        sys.exit(e.code)
    except KeyboardInterrupt:  # a second Ctrl-C, which does not wait for the step to end
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


def wait_for_the_printer():
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        time.sleep(QUIET_WAIT_S)


@contextlib.contextmanager
def together(world_size, device):
    """A block every process runs; a bad input met in it stops them all: the first process that met one raises it
    (cli prints it), the others raise Stop(2, quiet=True) and exit quietly. One all-reduce, at the end of the block."""
    error = None
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        error = e
    if world_size > 1:
        first = torch.tensor(dist.get_rank() if error else world_size, device=device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if first.item() < world_size and first.item() != dist.get_rank():
            raise Stop(2, quiet=True)
    if error is not None:
        error.first_to_meet_it = True  # cli prints it, whichever rank this is
        raise error


# ------------------------------------------------------------------------------------------- the output folder
@contextlib.contextmanager
def output_folder(folder, rank, world_size, device):
    """Hold `folder` for this run: rank 0 creates it and takes its lock. On the way out the lock is released; a folder
    this run created and left empty (it stopped before its first save) is removed."""
    created = not os.path.lexists(folder)
    with together(world_size, device):
        lock = take_lock(folder) if rank == 0 else None
    try:
        yield
    finally:
        if lock:
            with contextlib.suppress(OSError):  # a folder made read-only mid-run: the lock stays, the error shows
                os.remove(lock)
            if created:
                with contextlib.suppress(OSError):  # only succeeds when empty
                    os.rmdir(folder)


def take_lock(folder):
    """Create `folder` and its lock file (holding 'pid host'), which also proves the folder writable. A second run on
    the folder is refused while the first runs; a lock left by a dead process of this host is taken over."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output_dir {folder} is a file: give a folder")
    path = os.path.join(folder, LOCK)
    for _ in range(2):
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid, host = read_lock(path)
            if pid is not None and not (host == socket.gethostname() and not alive(pid)):
                raise ValueError(f"{folder} is in use by process {pid} on {host} ({path}): wait for that run to end, "
                                 "use another --output_dir, or delete the lock file if that run is over") from None
            print(f"taking over {path}: its process {pid if pid is not None else '(none recorded)'} is no longer "
                  "running")
            try:
                os.remove(path)
            except OSError as e:
                raise ValueError(f"cannot take over the stale lock {path} ({e.strerror}): make {folder} writable, or "
                                 "use another --output_dir") from None
            continue
        except OSError as e:
            raise ValueError(f"cannot write in --output_dir {folder} ({e.strerror}): choose a folder you can write "
                             "to") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}")
        return path
    raise ValueError(f"cannot take the lock {path}: another run is starting on the same folder")


def read_lock(path):
    """-> (pid, host) of a lock file this code wrote; (None, None) for an empty one (a run killed between creating
    and writing it). Anything else in its place is refused: it is not ours to delete."""
    what = None
    if os.path.islink(path):
        what = "a symbolic link"
    elif os.path.isdir(path):
        what = "a folder"
    elif not os.path.isfile(path):
        what = "not a regular file"
    if what is None:
        try:
            with open(path, "rb") as f:
                text = f.read(200).decode("ascii")
        except (OSError, UnicodeDecodeError):
            text = None
        if text == "":
            return None, None
        match = re.fullmatch(r"(\d+) (\S+)", text or "")
        if match:
            return int(match[1]), match[2]
        what = "a file of unreadable contents"
    raise ValueError(f"{path} is {what}, not a lock file this repository wrote: if no run is using "
                     f"{os.path.dirname(path) or '.'}, delete it and rerun")


def alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's; or a number no process can have
        return not isinstance(pid, int) or pid < 2 ** 31
    return True


# ------------------------------------------------------------------------------------------------ checkpoints
def save_atomic(obj, path):
    """torch.save to a temporary file beside `path` (path.tmp<pid>), fsync, rename: `path` is always the old file or
    the new one. Ctrl-C and SIGTERM wait until the file is in place. A failed write (a full disk) removes the temporary
    file and raises ValueError; the old file is kept."""
    tmp = f"{path}.tmp{os.getpid()}"
    with signals_held():
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise ValueError(f"cannot write {path} ({e.strerror or e}): free some space or use another --output_dir; "
                             "the previous checkpoint is intact") from None


def remove_stale_temporaries(folder):
    """Delete the temporary files save_atomic leaves when a run is killed mid-write (name.pth.tmp<pid>), and only
    those: a user's checkpoint.pth.tmp_notes.txt stays."""
    for name in os.listdir(folder):
        if re.fullmatch(r".+\.pth\.tmp\d+", name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM are held while the block runs (a file being written), then delivered as they came. (Masking
    the signals would not do: the kernel hands a process's signal to any thread that does not mask it, and Python
    runs its handler in the main thread all the same.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []

    def hold(signum, frame):
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in held:
            signal.raise_signal(s)


def check_resume(path, ckpt, record, ignored):
    """Refuse a checkpoint another run wrote: a key of arch, method (its name and teacher) or config (minus `ignored`,
    the flags that do not change what a run computes) that differs is named. Keys the checkpoint lacks (written before
    they existed) are not compared. A teacher is compared by content: the same file under a new path is accepted."""
    if not (isinstance(ckpt, dict) and "optimizer" in ckpt):
        raise ValueError(f"{path} is not a training checkpoint (no optimizer state): use --finetune to start from it")
    same_teacher = (record["method"].get("teacher_sha256") is not None and
                    (ckpt.get("method") or {}).get("teacher_sha256") == record["method"]["teacher_sha256"])
    diff = []
    for part, here in record.items():
        there = ckpt.get(part) or {}
        if not isinstance(there, dict):
            raise ValueError(f"{path} is damaged or was edited (its '{part}' is not a record): use another "
                             "--output_dir, or delete the file to start over")
        for key in sorted(there):
            if part == "config" and key in ignored:
                continue
            if same_teacher and key == "teacher":  # the same teacher file, moved: --teacher NEWPATH is accepted
                continue
            if key not in here or here[key] != there[key]:
                diff.append(f"{key} {there[key]!r} there, {here.get(key, 'unset')!r} here")
    if not diff:
        return
    epochs_only = all(d.startswith("epochs ") for d in diff)
    advice = "use another --output_dir, or the command that wrote it"
    if epochs_only:
        advice = (f"the schedule depends on --epochs, so a run cannot be lengthened in place: to train further, start "
                  f"a new --output_dir with --finetune {path}")
    raise ValueError(f"{path} is not a checkpoint of this run ({'; '.join(diff)}): {advice}")


# ------------------------------------------------------------------------------------------------- interrupts
class Interrupts:
    """With this block: SIGINT / SIGTERM are noted (`caught`) and acted on at the end of the step; a second one acts
    at once (the previous handler: KeyboardInterrupt for Ctrl-C)."""

    def __init__(self):
        self.caught = []
        self.previous = {}

    def note(self, signum, frame):
        self.caught.append(signum)
        signal.signal(signum, self.previous[signum])  # the next one of this kind is not waited for

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # (signals can only be handled there)
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self.note)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def exit_code(self):
        """143 after SIGTERM, 130 after SIGINT, 0 when neither came."""
        if signal.SIGTERM in self.caught:
            return 143
        return 130 if self.caught else 0


def agree_at_step_end(logs, want_save, interrupts, world_size, device):
    """The step's one host synchronisation: the logged values (tensors) averaged over processes, and whether any
    process wants a save (rank 0's clock) or was interrupted, so that all of them save or stop at the same step.
    -> ({name: float}, save now, exit code to stop with or 0)."""
    flags = [float(want_save), float(signal.SIGINT in interrupts.caught), float(signal.SIGTERM in interrupts.caught)]
    flags = torch.tensor(flags).to(device, non_blocking=True)
    packed = torch.cat([torch.stack(list(logs.values())), flags])
    if world_size > 1:
        dist.all_reduce(packed)
    *sums, save, sigint, sigterm = packed.tolist()
    values = {name: total / world_size for name, total in zip(logs, sums)}
    code = 143 if sigterm else 130 if sigint else 0
    return values, bool(save), code
