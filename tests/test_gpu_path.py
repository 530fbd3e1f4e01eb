"""The GPU path (issue 18, item 18), checked on the CPU: ``model.compile`` (torch.compile of
each network in place), ``model.channels_last``, fused Adam/AdamW on CUDA, training draws made
on the device, a training step that never reads a device value on the host, and
``bench/gpu_throughput.py``. The GPU figures are in docs/results.md ("GPU path")."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from genlab.families.base import fused_on_cuda
from genlab.families.common import DivergenceError
from genlab.nets.ema import EMA

from .conftest import REPO, TINY, compose_cfg, run_cli


class HostDraws(TorchDispatchMode):
    """Records random draws whose result lives on the CPU."""

    RANDOM = {"randn", "rand", "randint", "normal", "uniform", "random", "bernoulli", "randperm"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in self.RANDOM and any(t.device.type == "cpu" for t in leaves):
            self.seen.append(name)
        return out


NET = ["model.net.base_channels=8", "model.net.channel_mult=[1,2]",
       "model.net.attn_resolutions=[8]", "model.net.dropout=0.0"]  # fmt: skip


def build(model: str, tmp_path, *extra: str):
    cfg = compose_cfg(["data=synthetic", f"model={model}", *NET, *extra], tmp_path)
    torch.manual_seed(0)
    out = instantiate(cfg.model)
    with torch.no_grad():  # zero-initialised output layers would hide a wrong path
        for p in out.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return out


def loss_of(model, x, seed: int = 1) -> torch.Tensor:
    return model.loss(x, None, generator=torch.Generator().manual_seed(seed)).mean()


def test_fused_adam_on_cuda_only_and_never_over_an_explicit_choice():
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3)
    assert fused_on_cuda(adamw, torch.device("cuda")).keywords == {"lr": 1e-3, "fused": True}
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    assert fused_on_cuda(adam, torch.device("cuda")).keywords["fused"] is True
    assert fused_on_cuda(adamw, torch.device("cpu")) is adamw
    for explicit in ({"foreach": True}, {"fused": False}):
        chosen = functools.partial(torch.optim.AdamW, lr=1e-3, **explicit)
        assert fused_on_cuda(chosen, torch.device("cuda")) is chosen
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    assert fused_on_cuda(sgd, torch.device("cuda")) is sgd
    plain = lambda params: torch.optim.AdamW(params)  # noqa: E731 -- not a partial: untouched
    assert fused_on_cuda(plain, torch.device("cuda")) is plain


@pytest.mark.parametrize("model", ["diffusion", "edm"])
def test_channels_last_weights_and_batches_give_the_same_loss(model, tmp_path):
    plain = build(model, tmp_path)
    nhwc = build(model, tmp_path, "model.channels_last=true")
    nhwc.configure_model()
    convs = [m.weight for m in nhwc.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    batch = nhwc.on_after_batch_transfer((x, torch.zeros(4, dtype=torch.long)), 0)
    assert batch[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch[1], torch.zeros(4, dtype=torch.long))  # labels untouched
    assert plain.on_after_batch_transfer((x,), 0)[0] is x  # off: nothing converted
    torch.testing.assert_close(loss_of(nhwc, batch[0]), loss_of(plain, x), rtol=1e-5, atol=1e-6)


def test_compile_compiles_each_network_in_place(tmp_path):
    """aot_eager: Dynamo's graph capture and AOT autograd without inductor's C++ build."""
    eager = build("diffusion", tmp_path)
    compiled = build("diffusion", tmp_path, "model.compile={backend: aot_eager}")
    assert compiled.compile_options == {"backend": "aot_eager"}
    compiled.configure_model()
    assert [type(n).__name__ for n in compiled.networks()] == ["UNet"]  # not the EMA copy
    assert compiled.net._compiled_call_impl is not None
    assert compiled.ema.module._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep keys
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    a, b = loss_of(compiled, x), loss_of(eager, x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.backward()
    b.backward()
    for p, q in zip(compiled.net.parameters(), eager.net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    # sampling with the EMA weights swapped into the compiled network
    with torch.no_grad():
        for p in eager.ema.module.parameters():
            p.mul_(0.5)
        for p in compiled.ema.module.parameters():
            p.mul_(0.5)
    s_eager = eager.sample(2, generator=torch.Generator().manual_seed(0), use_ema=True)
    s_comp = compiled.sample(2, generator=torch.Generator().manual_seed(0), use_ema=True)
    torch.testing.assert_close(s_comp, s_eager, rtol=1e-4, atol=1e-4)
    s_raw = eager.sample(2, generator=torch.Generator().manual_seed(0), use_ema=False)
    assert (s_raw - s_eager).abs().max() > 1e-3  # the EMA weights were really used


def test_a_bad_compile_option_names_the_key(tmp_path):
    with pytest.raises(InstantiationException, match="model.compile must be true, false or torch"):
        build("diffusion", tmp_path, "model.compile=fast")


@pytest.mark.parametrize("model", ["diffusion", "edm", "flow", "diffusion_cond"])
def test_a_training_step_on_the_device_draws_there_and_never_reads_back(model, tmp_path):
    """On the meta device any host read (``.item()``, ``bool``, ``int``) raises and any noise
    drawn on the host and mixed in fails: the loss, the deferred finite check, backward and
    the EMA update of a step run there."""
    m = build(model, tmp_path).to("meta")
    x = torch.empty(4, 1, 16, 16, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta") if m.num_classes else None
    with HostDraws() as host:
        loss = m.loss(x, m._labels(y, drop=True)).mean()
    assert host.seen == []  # noise, timesteps, sigmas, label dropout: drawn on the device
    m.check_finite("train/loss", loss)
    loss.backward()
    grads = [p.grad for p in m.net.parameters()]
    assert all(g is not None and g.device.type == "meta" for g in grads)
    m.ema.update(m.net)  # the warm-up decay from a host copy of the update count
    assert set(m._nonfinite) == {"train/loss"}


def test_the_deferred_finite_check_stops_before_a_checkpoint(tmp_path, monkeypatch):
    m = build("diffusion", tmp_path)
    monkeypatch.setattr(type(m), "_defers_finite_check", staticmethod(lambda value: True))
    m.check_finite("train/loss", torch.tensor(0.5))
    m.raise_if_diverged()  # finite: nothing
    for step, value in [(3, float("nan")), (4, 1.0), (5, float("inf"))]:
        monkeypatch.setattr(type(m), "global_step", property(lambda self, s=step: s))
        m.check_finite("train/loss", torch.tensor(value))  # does not stop at once
    with pytest.raises(DivergenceError, match="train/loss is non-finite at step 3"):
        m.on_save_checkpoint({})  # before anything is written
    m.raise_if_diverged()  # read once: cleared


def test_ema_counts_on_the_host_and_reads_its_buffer_after_a_load():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.999)
    for _ in range(3):
        ema.update(net)
    assert ema._updates == 3 and int(ema.num_updates) == 3
    assert ema.current_decay() == pytest.approx(4 / 13)
    other = EMA(net, decay=0.999)
    other.current_decay()
    other.load_state_dict(ema.state_dict())
    assert other._updates is None and other.current_decay() == pytest.approx(4 / 13)


def test_gpu_throughput_bench_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "bench/gpu_throughput.py", "--device", "cpu", "--tiny", "--steps",
           "1", "--warmup", "1", "--batch", "4", "--variants", "fp32,bf16+cl+fused",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["gflops_per_image"] > 0 and result["peak_bf16_tflops"] is None
    rows = result["variants"]
    assert set(rows) == {"fp32", "bf16+cl+fused"}
    assert rows["fp32"]["optimizer"] == "AdamW(fused=None, foreach=True)"
    assert (
        rows["bf16+cl+fused"]["channels_last"]
        and rows["bf16+cl+fused"]["precision"] == "bf16-mixed"
    )
    assert all(r["images_per_s"] > 0 and r["mfu"] is None for r in rows.values())
    assert "fp32" in proc.stdout and "x fp32" in proc.stdout


def test_a_run_resumes_with_the_gpu_path_switched_on(tmp_path):
    """compile and channels_last are not part of a run's identity (its directory continues
    with them on); a checkpoint resumes with them and loads into a plain model."""
    from genlab.runs import load_model
    from genlab.train import config_hash

    on = ["model.channels_last=true", "model.compile={backend: aot_eager}"]
    plain_cfg = compose_cfg(["data=synthetic", "model=diffusion"], tmp_path)
    assert config_hash(compose_cfg(["data=synthetic", "model=diffusion", *on], tmp_path)) == (
        config_hash(plain_cfg)
    )
    plain = [x for x in TINY if not x.startswith("metrics")]
    base = ["model=diffusion", *plain, *NET, "metrics=none", "~callbacks.sample_grid"]
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run_cli([*base, "trainer.max_steps=2", f"hydra.run.dir={first}"], cwd=REPO)
    run_cli([*base, "trainer.max_steps=4", *on, f"ckpt_path={first}/checkpoints/last.ckpt",
             f"hydra.run.dir={resumed}"], cwd=REPO)  # fmt: skip
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 4
    assert "torch.compile" in (resumed / "train.log").read_text()
    model, _, _ = load_model(resumed, "last")
    assert model.net._compiled_call_impl is None


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_reaches_the_batches_a_datamodule_serves(tiny_cfg, monkeypatch,
                                                                channels_last):  # fmt: skip
    """Lightning calls the datamodule's on_after_batch_transfer instead of the module's; the
    datamodule hands its batch on to the family's prepare_batch."""
    import lightning as L

    import genlab.train as train_module

    seen = []

    class Look(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0].is_contiguous(memory_format=torch.channels_last))

    build_callbacks = train_module.build_callbacks
    monkeypatch.setattr(
        train_module, "build_callbacks", lambda cfg: [*build_callbacks(cfg), Look()]
    )
    layout = f"model.channels_last={str(channels_last).lower()}"
    cfg = tiny_cfg("model=diffusion", *NET, "data.channels=3", "trainer.max_steps=2",
                   "metrics.metrics=[]", layout)  # fmt: skip
    assert train_module.train(cfg)["status"] == "completed"
    assert seen == [channels_last, channels_last]
