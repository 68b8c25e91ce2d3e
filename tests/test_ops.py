"""Every registry op: opcheck on each sample, kernel against reference over sizes and dtypes,
and every error input rejected with the same sentence by the kernel and by the fake."""

import math
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ops_registry
from ops_registry import OPS
from ops_registry.quantize import quantize_reference
from ops_registry.testing import assert_equal, make_code

from conftest import DEVICES

SWEEP_SIZES = (0, 1, 255, 256, 257, 4097, 1_000_003)


def clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone(memory_format=torch.preserve_format)
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return x


def run_both(info, sample):
    """(args, output) after the kernel and after the reference, each on its own copy."""
    args_k, args_r = clone(sample.args), clone(sample.args)
    out_k = info.op(*args_k, **sample.kwargs)
    out_r = info.reference(*args_r, **sample.kwargs)
    return (args_k, out_k), (args_r, out_r)


def test_registry_lists_every_op():
    defined = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("adam8::")}
    assert defined == {info.name for info in OPS}
    for info in OPS:
        # zeros_managed has no tensor argument to dispatch on: one kernel for every device
        key = "CompositeExplicitAutograd" if info.name == "zeros_managed" else "CPU"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(info.qualname, key), info.name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info", OPS, ids=lambda i: i.name)
def test_opcheck(info, device):
    samples = list(info.sample_inputs(device))
    assert samples
    for args, kwargs in samples:
        torch.library.opcheck(info.op, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info", OPS, ids=lambda i: i.name)
def test_samples_match_reference(info, device):
    for sample in info.sample_inputs(device):
        info.compare(sample, *run_both(info, sample))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info", [i for i in OPS if "!" in i.schema], ids=lambda i: i.name)
def test_mutated_tensors_get_new_versions(info, device):
    """As ATen's in-place ops: autograd must see that the op changed a tensor saved for backward."""
    mutated = [i for i, a in enumerate(info.op._schema.arguments) if a.alias_info and a.alias_info.is_write]
    for sample in info.sample_inputs(device):
        args = clone(sample.args)
        tensors = [t for i in mutated for t in (args[i] if isinstance(args[i], list) else [args[i]])]
        before = [t._version for t in tensors]
        info.op(*args, **sample.kwargs)
        assert all(t._version > v for t, v in zip(tensors, before))


@pytest.mark.parametrize("numel", SWEEP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info", OPS, ids=lambda i: i.name)
def test_sweep_matches_reference(info, device, dtype, numel):
    for sample in info.sweep_inputs(device, dtype, numel):
        info.compare(sample, *run_both(info, sample))


def error_params():
    """One test per (op, device, error input), named by all three."""
    return [
        pytest.param(info, device, i, id=f"{info.name}-{device}-{i}")
        for device in DEVICES
        for info in OPS
        for i in range(len(list(info.error_inputs(device))))
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_blockwise_of_nonfinite_and_tiny_blocks(device, signed):
    """A NaN anywhere in a block (the fourth value, a block's last, a partial block's last: the
    kernels' vector and scalar paths) makes the block's absmax NaN, an inf makes it inf, and either
    gives every value of the block the code nearest 0, so the block dequantizes to NaN; blocks of
    subnormal values quantize as any other, also below 1 / FLT_MAX (2.9e-39), where 1 / absmax
    overflows (block_prescale). As the reference (the samples cannot hold these: opcheck compares
    outputs without equal_nan)."""
    code = make_code(signed, device)
    x = torch.randn(6 * 64 + 5, device=device)  # blocks of 64: 0-1 NaN, 2 inf, 3-4 subnormal, 6 NaN
    x = x if signed else x.abs()
    for i, value in ((3, math.nan), (127, -math.nan), (130, -math.inf if signed else math.inf),
                     (x.numel() - 1, math.nan)):
        x[i] = value
    x[192:256] *= 1e-40 / x[192:256].abs().max()  # below 1 / FLT_MAX
    x[256:320] *= 5e-39 / x[256:320].abs().max()
    q, absmax = torch.ops.adam8.quantize_blockwise(x, code, 64)
    ref_q, ref_absmax = quantize_reference(x, code, 64)
    assert_equal(q, ref_q)
    assert_equal(absmax, ref_absmax)
    assert absmax[[0, 1, 6]].isnan().all() and absmax[2] == math.inf and 0 < absmax[3] < 2.9e-39 < absmax[4]
    zero_code = int(code.abs().argmin())
    assert (q[:192] == zero_code).all() and (q[384:] == zero_code).all() and (q[192:320] != zero_code).any()
    out = torch.ops.adam8.dequantize_blockwise(q, absmax, code, 64, torch.float32)
    assert out[:192].isnan().all() and out[384:].isnan().all()
    for block in (3, 4):  # (the map's steps near its ends are a few % of the absmax)
        part = slice(64 * block, 64 * block + 64)
        assert ((out[part] - x[part]).abs() <= 0.05 * absmax[block]).all(), block


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_wise", [True, False], ids=["blockwise", "per_tensor"])
def test_8bit_step_absmax_of_a_nan_state_is_nan_wherever_it_sits(device, block_wise):
    """A state block whose absmax is inf (a corrupt checkpoint) dequantizes to NaN at its zero
    codes and to +-inf elsewhere. The step's new absmax of that block is then NaN, wherever the NaN
    sits (the kernels' vector and scalar paths, every lane), as the reference's: a float maximum
    kept or dropped the NaN depending on the order of its operands."""
    from ops_registry.adam import _adam8bit_sample, adam8bit_reference

    numel = 2 * 256 + 13  # block 2: 8 values for the vector path, 5 for the scalar one
    for k in (0, 3, 7, 8, 100, 255, 256 + 8, 256 + 12):
        sample = _adam8bit_sample(((numel,),), (torch.float32,), device,
                                  options=() if block_wise else ("per_tensor",))
        args = clone(sample.args)
        state1, absmax1, qmap1 = args[2][0], args[6][0], args[9]
        zero_code = int(qmap1.abs().argmin())
        first = 256 if k < 256 else 512
        state1[first:first + 256] = zero_code + 1  # +-inf after dequantization...
        state1[first + k % 256] = zero_code  # ...and one NaN (0 * inf)
        absmax1[first // 256 if block_wise else 0] = math.inf
        args_r = clone(args)
        torch.ops.adam8.adam8bit_step(*args, **sample.kwargs)
        adam8bit_reference(*args_r, **sample.kwargs)
        where = 2 if k >= 256 else 1
        got, ref = (absmax1[where], args_r[6][0][where]) if block_wise else (absmax1[0], args_r[6][0][0])
        assert got.isnan() and ref.isnan(), (k, got, ref)
        if block_wise:  # the other blocks as usual
            assert absmax1[0].isfinite() and absmax1[3 - where].isfinite()


@pytest.mark.parametrize("device", DEVICES)
def test_a_sparse_argument_is_refused_by_name(device):
    """The ops take dense tensors; a sparse one (COO or CSR) is named in a ValueError, not met
    with the dispatcher's "Could not run ... with arguments from the 'SparseCPU' backend"."""
    info = {i.name: i for i in OPS}
    for name, position, index in (("adam_step", 1, 0), ("adam8bit_step", 1, 0), ("percentile_clipping", 0, 0),
                                  ("quantize_blockwise", 0, None)):
        sample = next(iter(info[name].sample_inputs(device)))
        args = list(clone(sample.args))
        for to_sparse in (torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr):
            if index is None:
                dense, what = args[position], "x"
                args[position] = to_sparse(dense.float().reshape(-1, 1))
            else:
                dense = args[position][index]
                args[position] = [to_sparse(dense.reshape(-1, 1))] + list(args[position][1:])
                what = re.escape(f"{info[name].op._schema.arguments[position].name}[{index}]")
            with pytest.raises(ValueError, match=rf"adam8\.{name}: {what} has layout torch\.sparse_(coo|csr); the "
                               "kernels take dense"):
                info[name].op(*args, **sample.kwargs)
            args = list(clone(sample.args))


@pytest.mark.parametrize("info,device,index", error_params())
def test_error_input_rejected_alike_by_kernel_and_fake(info, device, index):
    sample, error_type, regex = list(info.error_inputs(device))[index]
    before = clone(sample.args)
    leaves = [t for t in torch.utils._pytree.tree_leaves(sample.args) if isinstance(t, torch.Tensor)]
    versions = [t._version for t in leaves]
    with pytest.raises(error_type, match=regex):
        info.op(*sample.args, **sample.kwargs)
    # A rejected call leaves its arguments, the mutable ones included, as they were: values and
    # versions (a new version would make autograd refuse a backward through an unchanged tensor).
    for a, b in zip(torch.utils._pytree.tree_leaves(sample.args), torch.utils._pytree.tree_leaves(before)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert [t._version for t in leaves] == versions
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, sample.args)
        with pytest.raises(error_type, match=regex):
            info.op(*fake_args, **sample.kwargs)


def test_every_op_has_error_inputs():
    for info in OPS:  # prefetch / page_out check little more than their list on the CPU
        assert len(list(info.error_inputs("cpu"))) >= (2 if info.name in ("prefetch", "page_out") else 5), info.name


def test_get_unknown_op_names_known_ones():
    with pytest.raises(KeyError, match="adam_step"):
        ops_registry.get("nope")


def test_quantize_with_codes_cycled_past_the_kept_tables():
    """The CPU kernels keep the lookup tables of recent codes (8): every call quantizes with its own
    code (as the reference) when codes come back while kept (A B A C A ...), when 11 codes cycle
    twice (each evicted and rebuilt), and when two codes differ in one value by one ulp (which moves
    a decision bound: a value on it quantizes differently under the two)."""
    from ops_registry.quantize import quantize_reference
    from torchadam8.qmap import create_dynamic_map

    gen = torch.Generator().manual_seed(3)
    signed = create_dynamic_map(True)
    codes = [signed, create_dynamic_map(False)]
    codes += [signed * (1 - k / 64) for k in range(1, 5)]  # table-path codes
    codes += [torch.sort(torch.rand(256, generator=gen) * 2 - 1).values for _ in range(5)]  # search path
    ulp = signed.clone()
    ulp[150] = torch.nextafter(ulp[150], torch.tensor(2.0))
    bound, moved = (signed[150] + signed[151]) / 2, (ulp[150] + ulp[151]) / 2
    assert moved != bound
    x = torch.rand(1000, generator=gen) * 1.8 - 0.9
    x[:6] = torch.tensor([moved, bound, 1.0, -1.0, 1e-9, -1e-9])  # block 0's absmax is 1: values as given
    q_signed, _ = quantize_reference(x, signed, 256)
    q_ulp, _ = quantize_reference(x, ulp, 256)
    assert q_signed[0] != q_ulp[0]  # the two codes' tables must not be confused
    for code in [signed, ulp, signed, codes[1], signed, ulp] + [codes[i % 11] for i in range(22)]:
        q, absmax = torch.ops.adam8.quantize_blockwise(x, code, 256)
        q_ref, absmax_ref = quantize_reference(x, code, 256)
        assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)
