"""P2: close() of a layer or a dictionary, and weight-policy toggles, while
other threads run forward; concurrent forwards stay concurrent."""

import threading
import time

from _probe import (QUICK, assert_close, build_layer, done, expect_raises, masa, np,
                    reference_grads, reps, x_of)

rng = np.random.default_rng(2)
ctx = masa.Context(2)
x = x_of(rng, 2, 16, 32)


def make():
    return build_layer(ctx, np.random.default_rng(3), 32, 4, causal=True, bias_proj="qkvo")


# 1. forwards racing a policy toggler: every output is right
built = make()
y_ref, _, _ = reference_grads(built, x, np.zeros_like(x))
errors, stop = [], threading.Event()


def forwards(n):
    for _ in range(n):
        try:
            assert_close(built.layer.forward(x), y_ref, what="forward during policy toggles")
        except Exception as e:  # noqa: BLE001
            errors.append(e)


def toggler():
    i = 0
    while not stop.is_set():
        built.layer.set_weight_policy("cached" if i % 2 == 0 else "on_the_fly")
        i += 1
        if QUICK:
            time.sleep(0.001)  # under valgrind threads run one at a time


threads = [threading.Thread(target=forwards, args=(reps(60),)) for _ in range(2)]
t = threading.Thread(target=toggler)
t.start()
for th in threads:
    th.start()
for th in threads:
    th.join()
stop.set()
t.join()
assert not errors, errors[:3]

# 2. close of the layer or of a dictionary while forwards run
for victim in ("layer", "dictionary"):
    built = make()
    layer = built.layer
    d = built.params["k"][1]
    results, errors = [], []

    def worker():
        for _ in range(reps(40)):
            try:
                results.append(layer.forward(x))
            except masa.ClosedHandleError:
                return
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    if victim == "layer":
        layer.close()
    else:
        expect_raises(masa.HandleInUseError, d.close, "close of a used dictionary")
    for th in threads:
        th.join()
    assert not errors, errors
    y_ref, _, _ = reference_grads(built, x, np.zeros_like(x))
    for y in results:
        assert_close(y, y_ref, what=f"forward racing the close of the {victim}")
    layer.close()
    d.close()

# 3. readers do not wait for each other: a forward completes while another
#    thread holds the layer's shared lock
built = make()
holding, release = threading.Event(), threading.Event()


def hold():
    with built.layer._locked():
        holding.set()
        release.wait(30)


h = threading.Thread(target=hold)
h.start()
holding.wait(30)
out = []
f = threading.Thread(target=lambda: out.append(built.layer.forward(x)))
f.start()
f.join(30)
finished = not f.is_alive()
release.set()
h.join()
f.join()
assert finished, "a forward waited for another reader"
# and a writer does wait: set_weight_policy blocks while a reader holds it
holding.clear()
release.clear()
h = threading.Thread(target=hold)
h.start()
holding.wait(30)
w = threading.Thread(target=lambda: built.layer.set_weight_policy("cached"))
w.start()
w.join(0.5)
waited = w.is_alive()
release.set()
h.join()
w.join()
assert waited, "set_weight_policy did not wait for a running reader"
ctx.close()
done("p2")
