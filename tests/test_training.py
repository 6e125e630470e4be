"""Training utilities: the IA3 gradient-norm callback in a real Trainer run, and the check of
feedforward_modules."""
import warnings

import pytest
import torch
from peft import IA3Config, get_peft_model
from transformers import Trainer, TrainingArguments

import ia3
from conftest import DEVICE
from helpers import TinyNet, ia3_config
from test_models import VOCAB, llama


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_for(model, tmp_path, **kwargs):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             logging_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no",
                             use_cpu=DEVICE == "cpu", disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=TinyDataset(), **kwargs)


def fused_llama():
    torch.manual_seed(0)
    base, config = llama()
    return ia3.fuse(get_peft_model(base, config))


def test_grad_norm_callback_logs_each_logging_step(tmp_path, triton_backend):
    model = fused_llama()
    seen = []
    trainer = trainer_for(model, tmp_path)
    callback = ia3.IA3GradNormCallback.install(trainer)
    original = callback.on_pre_optimizer_step

    def spy(args, state, control, model=None, **kwargs):
        norms = ia3.ia3_grad_norms(model)
        if norms is not None and callback._logs_this_step(args, state):
            seen.append((norms.mean().item(), norms.max().item()))
        return original(args, state, control, model=model, **kwargs)

    callback.on_pre_optimizer_step = spy
    trainer.train()
    logged = [h for h in trainer.state.log_history if "ia3_grad_norm_mean" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert [(h["ia3_grad_norm_mean"], h["ia3_grad_norm_max"]) for h in logged] == seen
    assert all(0 < mean <= largest for mean, largest in seen)


def test_grad_norm_callback_warns_once_when_vanished(tmp_path, triton_backend):
    model = fused_llama()
    trainer = trainer_for(model, tmp_path, callbacks=[ia3.IA3GradNormCallback(vanished_below=1e9)])
    with pytest.warns(RuntimeWarning, match="look vanished") as record:
        trainer.train()
    assert sum("look vanished" in str(w.message) for w in record) == 1


def test_check_feedforward_modules():
    with pytest.warns(UserWarning, match="matches no module"):
        problems = ia3.check_feedforward_modules(
            IA3Config(target_modules=".*(q|ff)", feedforward_modules=".*mlp"), TinyNet())
    assert len(problems) == 1
    with pytest.warns(UserWarning, match="target_modules does not"):
        ia3.check_feedforward_modules(
            IA3Config(target_modules=".*q", feedforward_modules=".*(ff|proj)"), TinyNet())
    adapted = get_peft_model(TinyNet(), ia3_config())  # (PEFT warns about Conv1D's fan_in_fan_out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ia3.check_feedforward_modules(ia3_config(), TinyNet()) == []
        assert ia3.check_feedforward_modules(ia3_config(), adapted) == []


def test_fuse_checks_the_config():
    model = get_peft_model(TinyNet(), IA3Config(target_modules=".*(q|ff)", feedforward_modules=".*mlp"))
    with pytest.warns(UserWarning, match="matches no module"):
        ia3.fuse(model)
