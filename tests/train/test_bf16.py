"""runtime.bf16: auto (the default) is on where the hardware has bf16, off elsewhere, and says why; tested by
faking the CPU's flags."""
import pytest
import torch

from kdprune.params import RuntimeParams, params_from_dict
from kdprune.train import runtime
from tests.helpers import default_params, params_with

CPU = torch.device("cpu")


def test_auto_is_the_default():
    assert RuntimeParams().bf16 == "auto"
    assert params_from_dict(default_params()).runtime.bf16 == "auto"


@pytest.mark.parametrize("flags, on", [({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "avx2"}, True),
                                       ({"avx512f", "avx2", "avx512_vnni"}, False), (set(), False)])
def test_auto_follows_the_cpu_flags(flags, on):
    got, why = runtime.bf16_choice(RuntimeParams(bf16="auto"), CPU, flags=flags)
    assert got is on and why.startswith("runtime.bf16 auto: this CPU has")
    assert ("has native bf16 (" in why) == on


def test_auto_reads_proc_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    real = runtime.cpu_flags
    monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": real(str(info)))
    assert runtime.bf16_choice(RuntimeParams(), CPU) == (True, "runtime.bf16 auto: this CPU has native bf16 (avx512_bf16)")
    info.write_text("flags : fpu avx2\n")
    assert runtime.bf16_choice(RuntimeParams(), CPU)[0] is False
    assert real(str(tmp_path / "missing")) == set()  # no /proc/cpuinfo (macOS): off


def test_true_and_false_are_taken_as_set_whatever_the_cpu():
    assert runtime.bf16_choice(RuntimeParams(bf16=True), CPU, flags=set()) == (True, "runtime.bf16: true")
    assert runtime.bf16_choice(RuntimeParams(bf16=False), CPU, flags={"amx_bf16"}) == (False, "runtime.bf16: false")


def test_the_log_line_says_which_and_why(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": {"avx512_bf16"})
    threads, lines = torch.get_num_threads(), []
    try:
        runtime.setup_runtime(RuntimeParams(device="cpu", threads=1), 0, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert lines == ["device: cpu (1 threads); training bf16 autocast on (runtime.bf16 auto: this CPU has native "
                     "bf16 (avx512_bf16))"]


def test_the_loop_trains_under_the_autocast_auto_chose(monkeypatch):
    """fit asks bf16_choice: with faked flags the forward runs in bf16, without them in fp32."""
    from kdprune.data import TensorLoader
    from kdprune.models import build_model, resnet_spec
    from kdprune.params import DistillParams
    from kdprune.train.loop import fit

    seen = []
    for flags in ({"avx512_bf16"}, set()):
        monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo", f=flags: f)
        torch.manual_seed(0)
        model = build_model(resnet_spec(8, 4, 1, 10))
        model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
        x, y = torch.randint(0, 255, (32, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (32,))
        loader = TensorLoader(x, y, [0.5], [0.25], batch_size=32, train=True)
        fit(model, loader, TensorLoader(x, y, [0.5], [0.25], 32, train=False), DistillParams(epochs=1, batch_size=32),
            runtime=RuntimeParams(threads=1), log=lambda m: None)
    assert seen == [torch.bfloat16, torch.float32]


def test_a_bad_value_names_the_key():
    with pytest.raises(Exception, match="runtime.bf16"):
        params_from_dict(params_with("runtime.bf16", "sometimes"))
