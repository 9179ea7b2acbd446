"""Arms timed in turns: each arm's stages (build and warm-up, then one timed window at a time,
then its profile pass) run round by round, one stage of every arm a round, each arm in its own
process (or in this one). A load from other processes or a change of clock speed then reaches
every arm's windows alike, and the ratios between arms compare windows of the same minutes.
As many arms share a round as the memory left after their warm-ups holds."""
from __future__ import annotations

import logging
import multiprocessing
import traceback
from typing import Any, Callable, Generator

from fastmoco.bench.measure import memory_available_bytes, peak_rss_bytes

log = logging.getLogger("fastmoco.bench")
Stages = Generator[None, None, Any]


class ArmFailed(RuntimeError):
    """An arm's stage raised, or its process died: the arm is listed as skipped, with why."""


def child_setup() -> None:
    """A spawned child inherits "spawn" as its start method; its DataLoader workers should start
    the way they would in a normal run (the platform's default, listed first)."""
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    logging.basicConfig(level=logging.INFO,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"


class LocalRun:
    """An arm's stages in this process (bench.isolate=false: every arm shares this process, its
    memory and its peak; one group)."""

    peak = {"host": 0, "device": 0}

    def __init__(self, make: Callable[..., Stages], args: tuple) -> None:
        self.stages = make(*args)

    def advance(self) -> tuple[bool, Any]:
        """One stage: (False, None), or (True, the stages' result) after the last."""
        try:
            next(self.stages)
            return False, None
        except StopIteration as done:
            return True, done.value
        except Exception as e:  # noqa: BLE001 - the arm is skipped with the reason, the bench goes on
            log.error("arm failed:\n%s", traceback.format_exc())
            raise ArmFailed(_reason(e)) from e

    def close(self) -> None:
        self.stages.close()


def _peaks() -> dict[str, int]:
    import torch

    device = torch.cuda.max_memory_reserved() if torch.cuda.is_initialized() else 0
    return {"host": peak_rss_bytes(), "device": device}


def _serve(conn, make: Callable[..., Stages], args: tuple) -> None:
    child_setup()
    try:
        stages = make(*args)
        while conn.recv() == "next":
            try:
                next(stages)
                conn.send(("stage", _peaks()))
            except StopIteration as done:
                conn.send(("done", done.value))
                return
    except EOFError:  # the bench went away
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent, which skips the arm
        log.error("arm failed:\n%s", traceback.format_exc())
        conn.send(("error", _reason(e)))


class ProcessRun:
    """An arm's stages in a fresh (spawned) process of its own, one stage per advance(). The
    process is a daemon (it dies with the bench): the model mode starts no worker processes."""

    def __init__(self, make: Callable[..., Stages], args: tuple) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, make, args), daemon=True)
        try:
            self.proc.start()
        finally:
            child.close()
        self.peak = {"host": 0, "device": 0}

    def advance(self) -> tuple[bool, Any]:
        try:
            self.conn.send("next")
            kind, value = self.conn.recv()
        except (EOFError, OSError) as e:
            self.proc.join(timeout=10)
            raise ArmFailed(f"its process died (exit code {self.proc.exitcode})") from e
        except Exception as e:  # noqa: BLE001 - e.g. a result that does not unpickle
            raise ArmFailed(_reason(e)) from e
        if kind == "error":
            raise ArmFailed(value)
        if kind == "done":
            self.proc.join(timeout=60)
            return True, value
        self.peak = value
        return False, None

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)
        self.conn.close()


def _start(make: Callable[..., Stages], args: tuple, isolate: bool):
    """An arm's run after its first stage (build and warm-up); ArmFailed where that failed."""
    try:
        run = (ProcessRun if isolate else LocalRun)(make, args)
    except Exception as e:  # noqa: BLE001 - a process that cannot start, arguments that cannot pickle
        raise ArmFailed(_reason(e)) from e
    try:
        done, _ = run.advance()
    except ArmFailed:
        run.close()
        raise
    if done:
        run.close()
        raise ArmFailed("its stages ended before its first timed window")
    return run


def _room_for_another(runs: dict[str, Any], headroom: float) -> bool:
    """Whether the memory left (host, and the GPU's where the arms use one) holds another arm
    of the largest size seen, `headroom` times."""
    left = memory_available_bytes()
    host = max(r.peak["host"] for r in runs.values())
    if left is not None and host and left < headroom * host:
        log.info("bench: %d arms in turns (%.1f GB of memory left, %.1f GB an arm at most)",
                 len(runs), left / 2**30, host / 2**30)
        return False
    device = max(r.peak["device"] for r in runs.values())
    if device:
        import torch

        free = torch.cuda.mem_get_info()[0]
        if free < headroom * device:
            log.info("bench: %d arms in turns (%.1f GB of GPU memory free, %.1f GB an arm at "
                     "most)", len(runs), free / 2**30, device / 2**30)
            return False
    return True


def in_turns(arms: dict[str, tuple], make: Callable[..., Stages], isolate: bool,
             on_group: Callable[[dict[str, Any]], None] = lambda group: None,
             headroom: float = 1.5) -> list[dict[str, Any]]:
    """Run `make(*args)` of every arm in turns; one {arm: result or ArmFailed} per group, each
    also passed to `on_group` as it ends.

    A group starts arms (their first stage: build and warm-up) until the memory left is under
    `headroom` × the largest arm's peak; then its stages run round by round, in reverse order
    every other round so that a drift of the machine's pace favours no arm."""
    pending = list(arms.items())
    groups = []
    while pending:
        runs: dict[str, Any] = {}
        out: dict[str, Any] = {}
        try:
            while pending:
                name, args = pending.pop(0)
                try:
                    runs[name] = _start(make, args, isolate)
                except ArmFailed as e:
                    out[name] = e
                    continue
                if pending and not _room_for_another(runs, headroom):
                    break
            order = list(runs)
            turn = 0
            while runs:
                for name in order if turn % 2 == 0 else order[::-1]:
                    if name not in runs:
                        continue
                    try:
                        done, value = runs[name].advance()
                    except ArmFailed as e:
                        done, value = True, e
                    if done:
                        runs.pop(name).close()
                        out[name] = value
                turn += 1
        finally:
            for run in runs.values():  # an interrupted bench leaves no process behind
                run.close()
        groups.append({name: out[name] for name in arms if name in out})
        on_group(groups[-1])
    return groups
