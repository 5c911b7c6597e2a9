"""How one optimizer step happens: plain PyTorch (DDP when several workers) or DeepSpeed ZeRO.

Both present the same small interface to the training loop, so the loop, validation, checkpoints
and resume are written once:

    loss = stepper.forward(inputs)            # the recipe's loss of one micro-batch (`loss_of`)
    stepper.backward(loss, boundary)          # boundary: last micro-batch of an optimizer step
    grad_norm = stepper.step()                # at a boundary: clip, optimizer, scheduler
    stepper.module                            # the bare model (generate, save)
    stepper.save_state(folder, rank) / stepper.load_state(folder)   # optimizer + scheduler (+ ZeRO shards)

DeepSpeed's checkpoint is written by every rank (each holds its own ZeRO shard); Ray Train merges
the files all workers report into one checkpoint folder.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from ray_ft.config import TrainConfig

TRAINER_STATE = "trainer_state.pt"
DEEPSPEED_DIR = "deepspeed"


def resolved_precision(tcfg: TrainConfig) -> str:
    """"auto": bf16 on GPU and on CPUs that compute bf16 natively (AVX512-BF16/AMX; the loss
    curve matched fp32's within the seed-to-seed spread and a packed LoRA step ran ~2x faster,
    bench/train_sft.py --precision), fp32 on other CPUs, where bf16 is emulated."""
    from ray_ft.devices import cpu_has_native_bf16

    if tcfg.precision == "auto":
        return "bf16" if tcfg.use_gpu or cpu_has_native_bf16() else "fp32"
    return tcfg.precision


def weights_dtype(tcfg: TrainConfig):
    """The dtype the model is loaded in. bf16 without DeepSpeed: LoRA's frozen base in bf16 (its
    adapters stay fp32, peft's default); freeze/full keep fp32 weights, since AdamW updating bf16
    weights in place rounds away every update under ~1/256 of a weight (no master copy), and
    compute in bf16 under autocast instead. DeepSpeed keeps its own fp32 master weights."""
    import torch

    bf16 = resolved_precision(tcfg) == "bf16" and not tcfg.deepspeed.stage
    return torch.bfloat16 if bf16 and tcfg.finetuning_type == "lora" else torch.float32


@contextlib.contextmanager
def compute_context(tcfg: TrainConfig, model=None):
    """Where the forward pass runs under bf16 without DeepSpeed: bf16 autocast, so every matmul
    runs in bf16 while trained weights stay fp32 (freeze/full: the whole model; lora: the fp32
    adapters on the bf16 base). For lora, peft's cast of each adapter's input to the adapter's
    fp32 is turned off: it copied every activation to fp32 and back around each adapted linear
    layer (~10% of a CPU step in a profile), where autocast casts the small adapter weights."""
    import torch

    if resolved_precision(tcfg) != "bf16" or tcfg.deepspeed.stage:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cuda" if tcfg.use_gpu else "cpu", dtype=torch.bfloat16))
        if tcfg.finetuning_type == "lora" and model is not None:
            from peft.helpers import disable_input_dtype_casting

            stack.enter_context(disable_input_dtype_casting(model))
        yield


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def deepspeed_config(tcfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config of this job: batch, accumulation, clipping and precision from `train.*`,
    ZeRO stage and offload from `train.deepspeed`, then the user's overrides merged on top."""
    zero: dict = {"stage": tcfg.deepspeed.stage, "contiguous_gradients": True, "overlap_comm": False}
    if tcfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": tcfg.use_gpu}
    if tcfg.deepspeed.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": tcfg.per_device_train_batch_size,
        "gradient_accumulation_steps": tcfg.gradient_accumulation_steps,
        "train_batch_size": tcfg.per_device_train_batch_size * tcfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": tcfg.max_grad_norm,
        "bf16": {"enabled": resolved_precision(tcfg) == "bf16"},
        "zero_optimization": zero,
        # Our optimizer is torch's AdamW (the same as without DeepSpeed): allow it under ZeRO and
        # with offload (DeepSpeed would otherwise insist on its compiled CPU Adam).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    return deep_merge(cfg, tcfg.deepspeed.overrides)


def training_loss(model):
    """How a micro-batch's loss is computed: logits at the trained positions only where the model
    supports it (`ray_ft.train.loss`), else the model's own loss."""
    from ray_ft.train.loss import answer_only_loss, model_loss, supports_logits_to_keep

    return answer_only_loss if supports_logits_to_keep(model) else model_loss


def _optimizer_and_scheduler(params, tcfg: TrainConfig, n_steps: int):
    import math

    import torch
    from transformers import get_scheduler

    optim = torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    sched = get_scheduler(tcfg.lr_scheduler_type, optim, math.ceil(tcfg.warmup_ratio * n_steps), n_steps)
    return optim, sched


class TorchStepper:
    """AdamW + scheduler + clipping; DDP (via Ray Train's `prepare_model`) when world > 1."""

    def __init__(self, model, tcfg: TrainConfig, n_steps: int, loss_of=None):
        import ray.train.torch

        self.module = model
        self.tcfg = tcfg
        self.loss_of = loss_of or training_loss(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optim, self.sched = _optimizer_and_scheduler(self.params, tcfg, n_steps)
        self.model = ray.train.torch.prepare_model(model)

    def forward(self, inputs: dict):
        with compute_context(self.tcfg, self.module):
            return self.loss_of(self.model, inputs)

    def backward(self, loss, boundary: bool) -> None:
        # Skip DDP's all-reduce on micro-batches that only accumulate.
        no_sync = getattr(self.model, "no_sync", None)
        with (no_sync() if no_sync and not boundary else contextlib.nullcontext()):
            loss.backward()  # already normalised over the whole step (num_items_in_batch)

    def step(self) -> float:
        import torch

        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.max_grad_norm)
        self.optim.step()
        self.sched.step()
        self.optim.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def gathered(self, params):
        return contextlib.nullcontext()

    def save_state(self, folder: Path, rank: int) -> None:
        import torch

        if rank == 0:
            torch.save({"optim": self.optim.state_dict(), "sched": self.sched.state_dict()}, folder / TRAINER_STATE)

    def load_state(self, folder: Path) -> None:
        import torch

        state = torch.load(folder / TRAINER_STATE, weights_only=False)
        self.optim.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])


class DeepSpeedStepper:
    """DeepSpeed engine (ZeRO-2/3) around the same optimizer and scheduler; the engine accumulates
    gradients and clips itself, so `step()` is called after every micro-batch's backward."""

    def __init__(self, model, tcfg: TrainConfig, n_steps: int, world_size: int, loss_of=None):
        import deepspeed

        self.tcfg = tcfg
        self.loss_of = loss_of or training_loss(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optim, sched = _optimizer_and_scheduler(params, tcfg, n_steps)
        self.config = deepspeed_config(tcfg, world_size)
        # Ray Train has already set up torch.distributed (gloo on CPU, NCCL on GPU); DeepSpeed
        # adopts that process group.
        self.engine, self.optim, _, self.sched = deepspeed.initialize(
            model=model, optimizer=optim, lr_scheduler=sched, config=self.config, dist_init_required=False)
        self.module = self.engine.module
        self.stage = tcfg.deepspeed.stage

    def forward(self, inputs: dict):
        return self.loss_of(self.engine, inputs)

    def backward(self, loss, boundary: bool) -> None:
        # The engine divides by the accumulation steps itself; the loss is already normalised
        # over the whole step (num_items_in_batch).
        self.engine.backward(loss * self.tcfg.gradient_accumulation_steps)

    def step(self) -> float | None:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def micro_step(self) -> None:
        """Non-boundary micro-batches: the engine still counts them (no optimizer step yet)."""
        self.engine.step()

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def gathered(self, params):
        """ZeRO-3 holds 1/world of each weight per rank: gather `params` for reading (collective)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None, enabled=self.stage == 3)

    def save_state(self, folder: Path, rank: int) -> None:
        # Collective: every rank writes its optimizer (and ZeRO-3 parameter) shard.
        self.engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=True)

    def load_state(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag="state", load_module_strict=False)
        if path is None:
            raise RuntimeError(f"{folder}: no DeepSpeed state to resume from")


def make_stepper(model, tcfg: TrainConfig, n_steps: int, world_size: int, loss_of=None):
    """`loss_of(wrapped_model, inputs)`: the recipe's objective (default: the causal-LM loss on
    the answer tokens); `stepper.forward` returns what it returns."""
    if tcfg.deepspeed.stage:
        return DeepSpeedStepper(model, tcfg, n_steps, world_size, loss_of)
    return TorchStepper(model, tcfg, n_steps, loss_of)
