"""A run's models, adapters and step, built from configs for counting their memory (``training.estimate``).

The step is the trainer's own (``training.step.training_loss``, ``training.network``, ``run_optimizer``,
the placement rules of ``training.placement``), so what is counted is what training does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer.adapters.quantized import PlaceholderWeight, is_quantized, quantize_frozen
from trainer.config.schema import TrainConfig
from trainer.data.batches import Batch
from trainer.sdxl.configs import Architecture
from trainer.sdxl.objective import training_noise_scheduler

from .memory import MemoryTracker, storage_bytes
from .network import inject_network, trainable_parameters
from .optimizers import run_optimizer
from .placement import (
    TEXT_ENCODERS,
    parked_components,
    quantized_components,
    text_encoders_run_every_step,
    weight_dtype,
)
from .sample_prompts import parse_prompt_line
from .setup import captions_vary
from .step import draw_step_noise, training_loss

TOKENS = 77
CPU = torch.device("cpu")  # the tensors' device; under FakeTensorMode their memory is counted, not used
BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256  # bitsandbytes' Optimizer8bit defaults


class _Tokenizer:
    """Token ids of the right shape (their values do not change memory)."""

    model_max_length = TOKENS

    def __call__(self, captions, **kwargs):
        return SimpleNamespace(input_ids=torch.zeros(len(captions), TOKENS, dtype=torch.long))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def model_tensors(models: list[nn.Module]) -> list[torch.Tensor]:
    """Every tensor the models hold: parameters, buffers and quantized storage."""
    tensors = []
    for model in models:
        tensors += [*model.parameters(), *model.buffers()]
        tensors += [module.quantized.storage for module in model.modules() if is_quantized(module)]
    return tensors


class _AdamW8bitMemory(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit as memory alone, because its kernels cannot run on fake tensors.

    The state is what its ``init_state`` makes: two uint8 moments and a float32 absmax per block of 256 values,
    or float32 moments for tensors under 4,096 values; its fused kernel updates in place (no temporaries).
    """

    def __init__(self, params) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for param in (p for group in self.param_groups for p in group["params"] if p.grad is not None):
            state = self.state[param]
            if state:
                continue
            small = param.numel() < BNB_MIN_8BIT_SIZE
            for moment in ("1", "2"):
                state[f"state{moment}"] = torch.zeros_like(param, dtype=torch.float32 if small else torch.uint8)
                if not small:
                    state[f"absmax{moment}"] = torch.zeros(-(-param.numel() // BNB_BLOCK))


class SimulatedRun:
    """The run's models built from their configs, placed and adapted as ``training.setup`` does it.

    Under ``FakeTensorMode`` (the estimate) nothing is allocated and no arithmetic is done; on real tensors
    (the tests that check the estimate) the same step really runs.
    """

    def __init__(
        self, config: TrainConfig, arch: Architecture, bucket: tuple[int, int], fused_optimizer: bool = True
    ) -> None:
        self.config, self.arch, self.notes, self.fused_optimizer = config, arch, [], fused_optimizer
        self.bucket = bucket  # (width, height) of the step
        self.dtype = weight_dtype(config)
        vary = captions_vary(config)
        encoders_every_step = text_encoders_run_every_step(config, vary)
        self.latents_cached = config.dataset.cache_latents and not config.dataset.random_crop
        self.offloaded = parked_components(self.latents_cached, captions_cached=not encoders_every_step)
        self.pipe = SimpleNamespace(tokenizer=_Tokenizer(), tokenizer_2=_Tokenizer())
        self.pipe.unet = self._unet()
        self.pipe.text_encoder, self.pipe.text_encoder_2 = (
            self._text_encoders() if encoders_every_step else (None, None)
        )
        # training reads the VAE's scaling factor even when its latents come from the cache
        self.pipe.vae = SimpleNamespace(config=SimpleNamespace(**arch.vae)) if self.latents_cached else self._vae()
        on_device = [name for name in ("unet", *TEXT_ENCODERS, "vae") if name not in self.offloaded]
        for name in quantized_components(config, vary):
            model = getattr(self.pipe, name)
            quantize_frozen(model, config.model.base_precision, CPU, self.dtype, storage=PlaceholderWeight)
        self.base_weights = {name: storage_bytes(model_tensors([getattr(self.pipe, name)])) for name in on_device}
        self.frozen = model_tensors([getattr(self.pipe, name) for name in on_device])
        self.adapters = inject_network(self.pipe, config)
        self.trainable = trainable_parameters(self.adapters)
        self._set_training_modes()
        self.optimizer = self._optimizer_with_state()
        self.adapter_bytes = storage_bytes(self.trainable.values())
        self.state_bytes = self._state_bytes() + self._ema_bytes()

    def _unet(self) -> nn.Module:
        with _default_dtype(self.dtype):
            return UNet2DConditionModel.from_config(self.arch.unet).requires_grad_(False).eval()

    def _text_encoders(self) -> tuple[nn.Module, nn.Module]:
        with _default_dtype(self.dtype):
            first = CLIPTextModel(CLIPTextConfig(**self.arch.text_encoder_1))
            second = CLIPTextModelWithProjection(CLIPTextConfig(**self.arch.text_encoder_2))
        return first.requires_grad_(False).eval(), second.requires_grad_(False).eval()

    def _vae(self) -> nn.Module:
        return AutoencoderKL.from_config(self.arch.vae).requires_grad_(False).eval()  # fp32, as training runs it

    def _set_training_modes(self) -> None:
        checkpointing = self.config.training.gradient_checkpointing
        self.pipe.unet.train()
        if checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
        if self.config.network.train_text_encoders:
            for name in TEXT_ENCODERS:
                getattr(self.pipe, name).train()
                if checkpointing:
                    getattr(self.pipe, name).gradient_checkpointing_enable()

    def _optimizer_with_state(self) -> torch.optim.Optimizer:
        """The run's optimizer (AdamW fused, as on CUDA, unless told otherwise) after one step of one parameter of
        each kind.

        An optimizer's state and work are per parameter, so one of each shape stands for all of its kind
        (``self.kinds``: the stand-in and how many it stands for); stepping 2,000 parameters one by one on
        fake tensors (Adafactor, Prodigy) would take minutes.
        """
        if self.config.optimizer.name == "adamw8bit":
            optimizer = _AdamW8bitMemory(self.trainable.values())
        else:
            optimizer, _ = run_optimizer(self.config.optimizer, self.adapters, 1000, fused=self.fused_optimizer)
        kinds: dict[tuple, list[nn.Parameter]] = {}
        for name, param in self.trainable.items():
            kinds.setdefault((tuple(param.shape), param.dtype, name.rsplit("/", 1)[1]), []).append(param)
        self.kinds = [(params[0], len(params)) for params in kinds.values()]
        for param, _ in self.kinds:
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return optimizer

    def _state(self) -> list[torch.Tensor]:
        """The state tensors that exist: those of the stand-ins."""
        return [value for state in self.optimizer.state.values() for value in state.values() if torch.is_tensor(value)]

    def _state_bytes(self) -> int:
        """The whole state: each stand-in's, times the parameters it stands for."""
        total = 0
        for param, count in self.kinds:
            tensors = [value for value in self.optimizer.state.get(param, {}).values() if torch.is_tensor(value)]
            total += storage_bytes(tensors) * count
        return total

    def _ema_bytes(self) -> int:
        """``training.ema_decay``'s moving average: a float32 copy of every trainable tensor, resident like the
        optimizer's state (``training.ema``)."""
        return sum(param.numel() * 4 for param in self.trainable.values()) if self.config.training.ema_decay else 0

    def count_training_step(self) -> tuple[int, int]:
        """(peak bytes, activations and temporaries at the peak) of one optimizer step."""
        batch, noise, session = self._step_inputs()
        static = [*self.frozen, *self.trainable.values()]
        resident = storage_bytes(static) + self.state_bytes
        inputs = [batch.time_ids, batch.moments if batch.moments is not None else batch.pixels]
        inputs += [noise.latent, noise.noise, noise.timesteps, session.noise_scheduler.alphas_cumprod]
        inputs += [t for pair in (session.text_cache or {}).values() for t in pair]
        tracker = MemoryTracker([*static, *self._state(), *inputs])
        autocast = torch.autocast(CPU.type, dtype=self.dtype, enabled=self.config.training.mixed_precision != "no")
        with tracker:
            losses = training_loss(session, self.pipe.unet, batch, noise, lambda: autocast)
            losses.sum().backward()
            del losses
            if self.config.optimizer.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.config.optimizer.max_grad_norm)
        with_gradients = tracker.live
        stand_ins = {id(param) for param, _ in self.kinds}
        for param in self.trainable.values():  # the optimizer's own temporaries: stepped on the stand-ins
            if id(param) not in stand_ins:
                param.grad = None
        step = MemoryTracker([*static, *self._state(), *(p.grad for p, _ in self.kinds if p.grad is not None)])
        with step:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        peak = max(tracker.peak, with_gradients + step.peak + self._foreach_temporaries())
        return resident + peak, max(peak - self.adapter_bytes, 0)

    def _foreach_temporaries(self) -> int:
        """What AdamW's multi-tensor form adds beyond the stand-ins' step: a group run that way (a small one off
        CUDA: ``optimizers.FOREACH_GROUP_BYTES``) makes a temporary the size of the whole group at once."""
        stand_ins = {id(param) for param, _ in self.kinds}
        extra = [
            storage_bytes([p for p in group["params"] if id(p) not in stand_ins])
            for group in self.optimizer.param_groups
            if group.get("foreach")
        ]
        return max(extra, default=0)

    def _step_inputs(self) -> tuple[Batch, object, SimpleNamespace]:
        """A batch at the bucket's size (cached moments, or pixels for the VAE), its noise, and the parts of a
        session ``training_loss`` reads."""
        config, (width, height), size = self.config, self.bucket, self.config.training.batch_size
        latent = (4, height // 8, width // 8)
        captions, time_ids = ["caption"] * size, torch.zeros(size, 6)
        if self.latents_cached:
            batch = Batch(captions, time_ids, torch.ones(size), moments=torch.zeros(size, 2 * latent[0], *latent[1:]))
        else:
            batch = Batch(captions, time_ids, torch.ones(size), pixels=torch.zeros(size, 3, height, width))
        if config.dataset.masked_loss:  # the loss then weighs every latent pixel: its temporaries count
            batch.mask = torch.ones(size, 1, *latent[1:])
        text_cache = None
        if self.pipe.text_encoder is None:  # captions cached: embeddings computed once, in the weights' dtype
            unet = self.pipe.unet.config
            pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
            embeds = torch.zeros(TOKENS, unet.cross_attention_dim, dtype=self.dtype)
            text_cache = {"caption": (embeds, torch.zeros(pooled, dtype=self.dtype))}
        schedule = training_noise_scheduler(
            self.arch.scheduler, config.model.prediction_type, config.model.zero_terminal_snr
        )
        session = SimpleNamespace(
            pipe=self.pipe,
            device=CPU,
            text_cache=text_cache,
            trains_text_encoders=config.network.train_text_encoders,
            noise_scheduler=schedule,
            config=config,
        )
        timesteps = schedule.config.num_train_timesteps
        return batch, draw_step_noise(size, latent, timesteps, config.training, CPU), session

    def count_sampling(self) -> int:
        """Peak bytes of drawing one sample as ``training.sampling`` does, with ``placement.on_device``: the
        VAE back on the device throughout, each offloaded text encoder only for its own forward; the UNet
        twice at once (the prompt and the negative prompt), then the VAE decode; the adapters and optimizer
        state stay meanwhile."""
        prompts = [parse_prompt_line(line) for line in self.config.sampling.prompts]
        sizes = [
            (p.width or self.config.dataset.resolution, p.height or self.config.dataset.resolution) for p in prompts
        ]
        width, height = max(sizes, key=lambda size: size[0] * size[1])
        encoders_visit = self.pipe.text_encoder is None
        if encoders_visit:
            self.pipe.text_encoder, self.pipe.text_encoder_2 = self._text_encoders()
        if self.latents_cached:
            self.pipe.vae = self._vae()
        self.notes.append("sampling is counted with the adapters unmerged (a merge moves each original weight to "
                          "CPU memory, and works on one layer at a time)")  # fmt: skip
        resident = [*self.frozen, *self.trainable.values(), *self._state()]
        if self.latents_cached:
            resident += model_tensors([self.pipe.vae])
        resident_bytes = storage_bytes(resident) - storage_bytes(self._state()) + self.state_bytes
        for model in (self.pipe.unet, self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.vae):
            model.eval()
        phases = []  # bytes beyond the resident ones at each phase's peak (a visiting encoder's weights included)

        def phase(run, visitor: nn.Module | None = None):
            visiting = model_tensors([visitor]) if visitor is not None else []
            tracker = MemoryTracker(resident + visiting)
            with tracker, torch.no_grad():
                result = run()
            phases.append(tracker.peak + storage_bytes(visiting))
            return result

        ids = torch.zeros(2, TOKENS, dtype=torch.long)  # the prompt and the negative prompt
        first_encoder, second_encoder = self.pipe.text_encoder, self.pipe.text_encoder_2
        first = phase(lambda: first_encoder(ids, output_hidden_states=True), first_encoder if encoders_visit else None)
        second = phase(
            lambda: second_encoder(ids, output_hidden_states=True), second_encoder if encoders_visit else None
        )
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        cond = {"text_embeds": second[0], "time_ids": torch.zeros(2, 6, dtype=self.dtype)}
        latents = torch.zeros(2, 4, height // 8, width // 8, dtype=self.dtype)
        timesteps = torch.tensor([999, 999])
        phase(lambda: self.pipe.unet(latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=cond))
        phase(lambda: self.pipe.vae.decode(torch.zeros(1, 4, height // 8, width // 8)))
        return resident_bytes + max(phases)
