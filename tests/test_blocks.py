"""ParallelLSTM and MultiTaskLSTM against the seed models written in plain PyTorch."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import mtl_kernels.grouped_rnn as grouped_rnn_module
from mtl_kernels import GroupedLSTM, MultiTaskLSTM, ParallelLSTM
from mtl_kernels.reference import MultiTaskLSTMRef, ParallelLSTMBlockRef


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("combine", ["concat", "attention", "mean", "sum", None])
def test_parallel_lstm_matches_seed_block(device, combine):
    torch.manual_seed(0)
    N, B, T, C, H = 3, 4, 6, 5, 7
    ref = ParallelLSTMBlockRef(N, C, H, combine=combine).double().to(device)
    block = ParallelLSTM(N, C, H, combine=combine).double().to(device)
    block.lstm = GroupedLSTM.from_lstms(ref.lstms)
    if combine == "concat":
        block.proj.load_state_dict(ref.proj.state_dict())
    if combine == "attention":
        block.attention.load_state_dict(ref.attention.state_dict())
    x = torch.randn(B, T, C, dtype=torch.float64, device=device, requires_grad=True)
    out, ref_out = block(x), ref(x)
    torch.testing.assert_close(out, ref_out)
    cot = torch.randn_like(out)
    (gx,) = _grads((out * cot).sum(), [x])
    (rgx,) = _grads((ref_out * cot).sum(), [x])
    torch.testing.assert_close(gx, rgx)


def _copy_multitask(ref, model):
    model.lstm = GroupedLSTM.from_lstms(ref.lstms)
    model.heads.load_state_dict(ref.heads.state_dict())
    if ref.embedding is not None:
        model.embedding.load_state_dict(ref.embedding.state_dict())


def test_multitask_matches_seed_model_with_embedding_and_lengths(device):
    torch.manual_seed(0)
    sizes = [3, 1, 5]
    ref = MultiTaskLSTMRef(None, 6, sizes, vocab_size=20, embedding_dim=4).double().to(device)
    model = MultiTaskLSTM(None, 6, sizes, vocab_size=20, embedding_dim=4).double().to(device)
    _copy_multitask(ref, model)
    tokens = torch.randint(0, 20, (5, 7), device=device)
    lengths = torch.tensor([7, 2, 5, 1, 6])
    outs, ref_outs = model(tokens, lengths), ref(tokens, lengths)
    assert [o.shape[-1] for o in outs] == sizes
    for o, r in zip(outs, ref_outs):
        torch.testing.assert_close(o, r)
    loss = sum(o.pow(2).sum() for o in outs)
    ref_loss = sum(o.pow(2).sum() for o in ref_outs)
    g = _grads(loss, [model.embedding.weight])[0]
    rg = _grads(ref_loss, [ref.embedding.weight])[0]
    torch.testing.assert_close(g, rg)
    # packed input gives the same as tokens + lengths
    packed = pack_padded_sequence(tokens, lengths, batch_first=True, enforce_sorted=False)
    for o, r in zip(model(packed), outs):
        torch.testing.assert_close(o, r)


def test_multitask_one_task_runs_only_its_group(device, monkeypatch):
    torch.manual_seed(0)
    ref = MultiTaskLSTMRef(4, 6, [2, 3, 4]).double().to(device)
    model = MultiTaskLSTM(4, 6, [2, 3, 4]).double().to(device)
    _copy_multitask(ref, model)
    x = torch.randn(5, 3, 4, dtype=torch.float64, device=device)
    seen = []
    real_layer = grouped_rnn_module.recurrence_layer

    def spy(cell, input, weight_ih, *args, **kwargs):
        seen.append(weight_ih.shape[0])
        return real_layer(cell, input, weight_ih, *args, **kwargs)

    monkeypatch.setattr(grouped_rnn_module, "recurrence_layer", spy)
    out = model(x, task=1)
    assert seen == [1]  # one group's recurrence, not all three
    torch.testing.assert_close(out, ref(x, task=1))
    out.sum().backward()
    assert (model.lstm.weight_hh_l0.grad[[0, 2]] == 0).all()
    assert model.heads[0].weight.grad is None


def test_multitask_per_task_inputs_and_pooling(device):
    torch.manual_seed(0)
    model = MultiTaskLSTM(4, 5, [2, 2], pooling="mean").double().to(device)
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64, device=device)  # (K, B, T, C)
    lengths = torch.tensor([6, 2, 4])
    outs = model(x, lengths)
    seq, _ = model.lstm(x)  # without lengths: padding steps differ, but valid steps do not
    for k in range(2):
        pooled = torch.stack([seq[k, b, :n].mean(0) for b, n in enumerate(lengths.tolist())])
        torch.testing.assert_close(outs[k], model.heads[k](pooled))
    model.pooling = "max"
    outs = model(x, lengths)
    pooled = torch.stack([seq[1, b, :n].amax(0) for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(outs[1], model.heads[1](pooled))
    torch.testing.assert_close(model(x, task=1), model(x)[1])


def test_block_errors():
    with pytest.raises(ValueError, match="combine"):
        ParallelLSTM(2, 3, 4, combine="max")
    with pytest.raises(ValueError, match="pooling"):
        MultiTaskLSTM(3, 4, [2], pooling="first")
    with pytest.raises(ValueError, match="task must lie"):
        MultiTaskLSTM(3, 4, [2, 2])(torch.randn(2, 5, 3), task=2)
    with pytest.raises(ValueError, match="3-D"):
        ParallelLSTM(2, 3, 4)(torch.randn(2, 2, 5, 3))
