"""The graph Inductor runs for a compiled step (expecttest): exactly which adam8 ops run, on which
tensors, and that no optimizer state is copied: the ops mutate the inputs in place (re-inplacing
works), and the only copies left are copy_(x, x) write-backs of an input onto itself (no-ops)."""

import expecttest
import torch
import torch._inductor.fx_passes.post_grad as post_grad

import torchadam8
from conftest import render


class TestCompiledStepGraph(expecttest.TestCase):
    def test_adam8bit_step_graph(self):
        graphs = []
        original = post_grad.decompose_auto_functionalized

        def record(graph):  # the last pass of Inductor's post-grad passes, after re-inplacing
            out = original(graph)
            graphs.append(render(graph))
            return out

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 32, bias=False))
        opt = torchadam8.Adam8bit(model.parameters(), lr=torch.tensor(1e-3))  # the bias (128) stays 32-bit
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()  # the state exists before tracing
        before = {id(t): t.data_ptr() for s in opt.state.values() for t in s.values()}
        torch._dynamo.reset()
        post_grad.decompose_auto_functionalized = record
        try:  # (no cache: the passes must run)
            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                torch.compile(opt.step, fullgraph=True)()
        finally:
            post_grad.decompose_auto_functionalized = original
        after = {id(t): t.data_ptr() for s in opt.state.values() for t in s.values()}
        self.assertEqual(before, after)  # the same state tensors, updated in place
        self.assertEqual(float(opt.state[model[0].weight]["step"]), 2.0)
        self.assertExpectedInline(graphs[-1], """\
aten.full.default([], 1)
aten.mul.Tensor(full, 0.9)
aten.mul.Tensor(full, 0.999)
aten.full.default([1], 0.9)
aten.full.default([1], 0.999)
aten.cat.default([full_default, full_default_1])
adam8.adam8bit_step.default([f32[128, 64]#0, f32[32, 128]#2], [f32[128, 64]#19, f32[32, 128]#20], [u8[128, 64]#6, u8[32, 128]#7], [u8[128, 64]#8, u8[32, 128]#9], [], [f32[]#10, f32[]#11], [f32[32]#12, f32[16]#13], [f32[32]#14, f32[16]#15], [], f32[256]#17, f32[256]#18, f32[]#16, cat, None, None, 1e-08, 0.0, 0.0, False, True)
aten.full.default([], 1)
aten.mul.Tensor(full_1, 0.9)
aten.mul.Tensor(full_1, 0.999)
aten.full.default([1], 0.9)
aten.full.default([1], 0.999)
aten.cat.default([full_default_2, full_default_3])
adam8.adam_step.default([f32[128]#1], [f32[128]#21], [f32[128]#4], [f32[128]#5], [], [f32[]#3], f32[]#16, cat_1, None, None, 1e-08, 0.0, 0.0, False)
16 self-copies""")
