"""P3: os.fork() with a live default context: a child that never uses masa
exits normally (the exit finalizers destroy the inherited context); a child
that uses it gets right results; forking while parent threads run forward
leaves no child hung."""

import os
import threading
import time
import warnings

from _probe import assert_close, build_layer, done, masa, np, reference_grads, x_of

warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)

rng = np.random.default_rng(4)
ctx = masa.default_context()
built = build_layer(ctx, rng, 16, 2, causal=True, bias_proj="o")
x = x_of(rng, 2, 8, 16)
y_ref, _, _ = reference_grads(built, x, np.zeros_like(x))
assert_close(built.layer.forward(x), y_ref, what="parent")


def wait(pid, seconds=120):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hung"


def child(use):
    """Runs in the child: returns normally so the interpreter's exit path
    (atexit, weakref finalizers: masa_context_destroy) runs."""
    code = 0
    if use:
        try:
            assert_close(built.layer.forward(x), y_ref, what="child")
            built.layer.set_weight_policy("cached")
            assert_close(built.layer.forward(x), y_ref, what="child, cached")
        except Exception as e:  # noqa: BLE001
            print("child failed:", e)
            code = 3
    return code


def fork_and_wait(use):
    pid = os.fork()
    if pid == 0:
        code = child(use)
        # sys.exit in a forked child would unwind into the caller's frames
        # (the test loop); run the normal exit path explicitly instead
        import atexit
        atexit._run_exitfuncs()
        os._exit(code)
    return wait(pid)


assert fork_and_wait(False) == 0
assert fork_and_wait(True) == 0

# forking while two parent threads run forward
stop, errors = threading.Event(), []


def loop():
    while not stop.is_set():
        try:
            built.layer.forward(x)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            return


threads = [threading.Thread(target=loop) for _ in range(2)]
for t in threads:
    t.start()
codes = [fork_and_wait(i % 2 == 1) for i in range(int(os.environ.get("PROBE_FORKS", "12")))]
stop.set()
for t in threads:
    t.join()
assert not errors, errors
assert codes == [0] * len(codes), codes
assert_close(built.layer.forward(x), y_ref, what="parent after the forks")
done("p3")
