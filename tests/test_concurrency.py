"""One model called from several threads gives each caller the answer it gets alone (torch and ONNX
backends), and a thread that interleaves two of its own streams gets a ModelBusyError, not a hang."""
import threading

import numpy as np
import pytest

from edgelmm import EdgeLMM
from edgelmm.errors import ModelBusyError

THREADS, CALLS = 8, 3
PROMPTS = ("What is in the picture?", "Describe the colours.", "Count the objects.", "Is it day or night?")


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def _request(thread: int, call: int) -> dict:
    """A different image, prompt and sampling seed for every call; half greedy, half sampled."""
    n = thread * CALLS + call
    sampling = {"max_new_tokens": 6, "seed": n}
    if n % 2:
        sampling.update(temperature=0.9, top_k=20)
    return {"image": _image(n % 5), "prompt": PROMPTS[n % len(PROMPTS)], **sampling}


def _answer(model: EdgeLMM, request: dict) -> list[int]:
    request = dict(request)
    return model.generate(request.pop("image"), request.pop("prompt"), **request).token_ids


def _run_in_threads(model: EdgeLMM) -> dict[tuple[int, int], list[int]]:
    answers, errors = {}, []
    start = threading.Barrier(THREADS)

    def work(thread: int) -> None:
        try:
            start.wait()
            for call in range(CALLS):
                answers[thread, call] = _answer(model, _request(thread, call))
        except Exception as e:  # noqa: BLE001 - reported below with the thread that raised it
            errors.append((thread, e))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not any(w.is_alive() for w in workers), "a thread is still waiting for the model"
    assert not errors, errors
    return answers


def _check_threads_match_serial(model: EdgeLMM) -> None:
    serial = {(t, c): _answer(model, _request(t, c)) for t in range(THREADS) for c in range(CALLS)}
    assert len({tuple(v) for v in serial.values()}) > THREADS, "the requests must give different answers"
    assert _run_in_threads(model) == serial


@pytest.fixture(scope="module")
def torch_model(tiny_checkpoint):
    pytest.importorskip("torch")
    return EdgeLMM.load(tiny_checkpoint("tinyllava"), device="cpu")


def test_threads_get_their_single_threaded_answers_torch(torch_model):
    _check_threads_match_serial(torch_model)


def test_threads_get_their_single_threaded_answers_onnx(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgelmm.export.onnx_export import export_onnx

    out = export_onnx(tiny_checkpoint("tinyllava"), tmp_path / "onnx", None, progress=False, vision_bits=16)
    _check_threads_match_serial(EdgeLMM.load(out))


def test_a_second_stream_on_the_same_thread_is_refused(torch_model):
    image, prompt = _image(0), PROMPTS[0]
    expected = torch_model.generate(image, prompt, max_new_tokens=6).text
    first = torch_model.stream(image, prompt, max_new_tokens=6)
    head = next(first)
    with pytest.raises(ModelBusyError, match="close"):
        torch_model.ask(image, prompt, max_new_tokens=6)
    assert head + "".join(first) == expected  # the refused call left the first answer intact
    assert torch_model.ask(image, prompt, max_new_tokens=6) == expected


def test_a_closed_or_dropped_stream_frees_the_model(torch_model):
    image, prompt = _image(1), PROMPTS[1]
    expected = torch_model.ask(image, prompt, max_new_tokens=6)
    closed = torch_model.stream(image, prompt, max_new_tokens=6)
    next(closed)
    closed.close()
    assert torch_model.ask(image, prompt, max_new_tokens=6) == expected
    dropped = torch_model.stream(image, prompt, max_new_tokens=6)
    next(dropped)
    del dropped
    answer = []
    other = threading.Thread(target=lambda: answer.append(torch_model.ask(image, prompt, max_new_tokens=6)))
    other.start()
    other.join(timeout=60)
    assert answer == [expected]
