"""Per-rank memory estimate of a training run, printed by ``dry_run`` before any GPU is used.

The arithmetic a 7B config states in its comments, computed from the model's shape (built on
the meta device) and the config, so that a setting that cannot fit is caught in seconds:

- fp32 master parameters, fp32 gradients, AdamW's fp32 ``m`` and ``v``: 16 bytes per
  parameter, sharded over all ``dp_shard × tp`` ranks (FSDP2 shards what TP leaves);
- FSDP2's unsharded compute copies in the compute dtype: the root (embedding, output
  projection; it is not resharded after forward) and two gathered blocks (one in use, one
  prefetched);
- with ``loss.kl_coef > 0``, the frozen reference policy: built and sharded like the policy
  (fp32, over the same ranks) but parameters only, no gradients or optimizer state; the
  recipe reshards it after its forward-only pass, so it keeps no compute copies;
- with ``ppo.defer_grad_sync`` over several data-parallel ranks, the unsharded fp32
  gradients each rank accumulates until the mini-batch's last micro-batch, and the gathered
  compute copies of the other blocks, kept between micro-batches so that no forward
  all-gathers them again;
- activations of one micro-batch (``ppo.max_tokens_per_micro_batch`` tokens, or
  ``micro_batch_size`` rows padded to prompt + response tokens), with and without
  activation checkpointing;
- the loss's chunk: ``[C, V]`` fp32 logits and their gradient, plus its fp32 ``[V, D]``
  weight-gradient accumulator;
- the weights published to the generation engines, in the engine's dtype.

Activations per token per block, in the compute dtype, are what autograd keeps in a
Qwen2/Llama block with fused (SDPA) attention, which stores no ``[T, T]`` scores: the two
norms' inputs and outputs (4·D, replicated under TP), and, split over TP, the query and
attention output (2·D), keys and values (2·D_kv), and the SwiGLU's gate, up, activation and
product (4·I). With checkpointing only each block's input (D) is kept, and one block's
activations are rebuilt at a time in backward. An estimate: allocator fragmentation,
NCCL buffers and the CUDA context (about 1 GiB) come on top.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from omegaconf import DictConfig

GIB = 2**30
# Bytes per element of the dtype names that configs use (engine_kwargs.dtype, mixed_precision).
_DTYPE_BYTES = {
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "half": 2,
    "fp16": 2,
    "float32": 4,
    "float": 4,
    "fp32": 4,
}
FP32 = 4
MASTER_BYTES = FP32  # the recipe builds the model in fp32; FSDP2 keeps fp32 master weights


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs, read off a torchtune ``TransformerDecoder``."""

    num_params: int
    root_params: int  # embedding, final norm, untied output projection: FSDP2's root unit
    block_params: int
    num_layers: int
    dim: int
    kv_dim: int
    intermediate_dim: int
    vocab_size: int

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelShape:
        block = model.layers[0]
        block_params = sum(p.numel() for p in block.parameters())
        num_params = sum(p.numel() for p in model.parameters())
        attn = block.attn
        return cls(
            num_params=num_params,
            root_params=num_params - len(model.layers) * block_params,
            block_params=block_params,
            num_layers=len(model.layers),
            dim=model.tok_embeddings.embedding_dim,
            kv_dim=attn.num_kv_heads * attn.head_dim,
            intermediate_dim=block.mlp.w1.out_features,
            vocab_size=model.tok_embeddings.num_embeddings,
        )


@dataclass
class MemoryPlan:
    """Bytes per trainer rank (``publication``: bytes of one weight publication)."""

    parameters: int
    gradients: int
    optimizer_state: int
    compute_copies: int
    reference: int  # the KL penalty's frozen reference policy (loss.kl_coef > 0)
    deferred_gradients: int  # unsharded fp32 gradients while sync waits for the last micro-batch
    deferred_parameters: int  # the blocks' gathered compute copies kept meanwhile
    activations_checkpointed: int
    activations_full: int
    loss_chunk: int
    publication: int
    delta_base: int  # host RAM: the last publication's bytes, kept for the next delta
    activation_checkpointing: bool
    device_memory: int | None  # bytes; None when neither the config nor the device says
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def activations(self) -> int:
        if self.activation_checkpointing:
            return self.activations_checkpointed
        return self.activations_full

    @property
    def total(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.optimizer_state
            + self.compute_copies
            + self.reference
            + self.deferred_gradients
            + self.deferred_parameters
            + self.activations
            + self.loss_chunk
        )

    def warnings(self) -> list[str]:
        if self.device_memory is None or self.total <= self.device_memory:
            return []
        hint = (
            ""
            if self.activation_checkpointing
            else " (parallel.activation_checkpointing=true would need "
            f"{(self.total - self.activations_full + self.activations_checkpointed) / GIB:.1f} GiB)"
        )
        return [
            f"memory plan: about {self.total / GIB:.1f} GiB per trainer rank exceeds the "
            f"device's {self.device_memory / GIB:.1f} GiB{hint}; lower ppo.micro_batch_size "
            "or loss.chunk_size, or shard over more ranks"
        ]

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "notes"}
        out.update(total=self.total, warnings=self.warnings(), notes=dict(self.notes))
        return out

    def report(self) -> list[str]:
        """Human-readable lines for ``dry_run``."""

        def gib(x: int) -> str:
            return f"{x / GIB:8.2f} GiB"

        used = "with" if self.activation_checkpointing else "without"
        lines = [
            f"parameters (fp32)      {gib(self.parameters)}",
            f"gradients (fp32)       {gib(self.gradients)}",
            f"optimizer state        {gib(self.optimizer_state)}   {self.notes['optimizer']}",
            f"compute copies         {gib(self.compute_copies)}   {self.notes['compute']}",
            f"reference model        {gib(self.reference)}   {self.notes['reference']}",
            f"deferred gradients     {gib(self.deferred_gradients)}   {self.notes['deferred']}",
            f"deferred parameters    {gib(self.deferred_parameters)}",
            f"activations, AC        {gib(self.activations_checkpointed)}   {self.notes['tokens']}",
            f"activations, no AC     {gib(self.activations_full)}",
            f"loss chunk             {gib(self.loss_chunk)}   {self.notes['loss']}",
            f"total per rank         {gib(self.total)}   ({used} activation checkpointing)",
            "device                 "
            + (gib(self.device_memory) if self.device_memory else "     unknown")
            + f"   {self.notes['device']}",
            f"publication            {gib(self.publication)}   {self.notes['publication']}",
            f"delta base (host RAM)  {gib(self.delta_base)}   {self.notes['delta']}",
        ]
        return lines


def _dtype_bytes(name: str, key: str) -> int:
    try:
        return _DTYPE_BYTES[str(name).lower()]
    except KeyError:
        raise ValueError(f"{key}: unknown dtype {name!r} (known: {sorted(_DTYPE_BYTES)})") from None


def _optimizer_states(optimizer_cfg: DictConfig | None) -> tuple[int, str]:
    """fp32 state tensors per parameter: 2 for Adam/AdamW (m, v), 1 for SGD with momentum."""
    component = str((optimizer_cfg or {}).get("_component_", ""))
    name = component.rsplit(".", 1)[-1]
    if name.lower().startswith("adam"):
        return 2, f"{name}: fp32 m and v"
    if name == "SGD":
        momentum = float((optimizer_cfg or {}).get("momentum", 0.0))
        return (1, "SGD: fp32 momentum") if momentum else (0, "SGD: no state")
    return 2, f"{name or 'optimizer'}: assumed 2 fp32 states per parameter, as AdamW"


def device_memory_bytes(cfg: DictConfig) -> tuple[int | None, str]:
    """The memory one trainer rank may use: ``device_memory_gib`` from the config, else the
    total memory of the CUDA device this process sees, else unknown."""
    configured = cfg.get("device_memory_gib")
    if configured is not None:
        return int(float(configured) * GIB), "device_memory_gib from the config"
    if str(cfg.device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(cfg.device))
        return int(props.total_memory), f"{props.name}"
    return None, "set device_memory_gib to check against a device"


def estimate_memory(shape: ModelShape, cfg: DictConfig, dp: int, tp: int) -> MemoryPlan:
    """The per-rank memory plan of ``cfg`` (a schema-checked recipe config) for a model of
    ``shape`` on a ``dp × tp`` mesh."""
    p, r = cfg.parallel, cfg.rollout
    shards = dp * tp
    compute_bytes = _dtype_bytes(p.mixed_precision or "fp32", "parallel.mixed_precision")
    fsdp = shards > 1 or compute_bytes != MASTER_BYTES  # the recipe applies FSDP2 under torchrun

    n_states, optimizer_note = _optimizer_states(cfg.get("optimizer"))
    parameters = shape.num_params * MASTER_BYTES // shards
    optimizer_state = n_states * shape.num_params * FP32 // shards

    compute_copies = 0
    compute_note = "none: one process computes with its fp32 parameters"
    if fsdp:
        compute_copies = (shape.root_params + 2 * shape.block_params) * compute_bytes // tp
        compute_note = f"root + 2 gathered blocks, {compute_bytes} B/param"

    d, kv, i = shape.dim, shape.kv_dim, shape.intermediate_dim
    per_token_block = 4 * d + (2 * d + 2 * kv + 4 * i) // tp  # elements (module docstring)
    seq = r.max_prompt_tokens + r.max_response_tokens
    # a token budget per micro-batch (ppo.max_tokens_per_micro_batch), else whole padded rows
    budget = cfg.ppo.get("max_tokens_per_micro_batch")
    tokens = int(budget) if budget else cfg.ppo.micro_batch_size * seq
    tokens_note = (
        f"budget {tokens} tokens"
        if budget
        else f"micro-batch {cfg.ppo.micro_batch_size} x {seq} tokens"
    )
    activations_full = tokens * shape.num_layers * per_token_block * compute_bytes
    activations_checkpointed = (
        tokens * shape.num_layers * d * compute_bytes + tokens * per_token_block * compute_bytes
    )

    # Chunks hold whole responses: a response longer than chunk_size is a chunk of its own.
    chunk_size = int(cfg.loss.get("chunk_size", 1024))
    chunk = min(max(chunk_size, r.max_response_tokens), tokens)
    loss_chunk = 2 * chunk * shape.vocab_size * FP32 + shape.vocab_size * d * FP32

    g = cfg.generation
    engine_dtype = "float32" if g.backend == "native" else g.engine_kwargs.get("dtype", "auto")
    publication_note = f"engine dtype {engine_dtype}"
    if engine_dtype == "auto":
        engine_dtype = "bfloat16"
        publication_note = "engine dtype auto: bf16 checkpoints assumed"
    publication = shape.num_params * _dtype_bytes(engine_dtype, "generation.engine_kwargs.dtype")
    deltas = bool(g.get("weight_delta", False)) and g.get("weight_transfer", "files") == "files"

    # loss.kl_coef > 0: the recipe builds the reference like the policy (fp32, sharded over
    # the same ranks) and keeps only its parameters
    with_reference = float(cfg.loss.get("kl_coef", 0.0)) > 0
    reference = shape.num_params * MASTER_BYTES // shards if with_reference else 0
    reference_note = (
        f"loss.kl_coef > 0: fp32 parameters over {shards} ranks" if with_reference else "none"
    )

    # ppo.defer_grad_sync: FSDP2 accumulates unsharded gradients (reduce dtype fp32) on each
    # rank until the mini-batch's last micro-batch reduces them
    deferred = bool(cfg.ppo.get("defer_grad_sync", False)) and dp > 1
    deferred_gradients = shape.num_params * FP32 // tp if deferred else 0
    # ... and keeps the parameters it gathered (set_gradient_sync): every block's compute
    # copy, of which two are counted in compute_copies already
    other_blocks = shape.num_layers - 2
    deferred_parameters = (
        max(other_blocks, 0) * shape.block_params * compute_bytes // tp if deferred else 0
    )
    deferred_note = (
        f"ppo.defer_grad_sync: unsharded fp32 grads, gathered {compute_bytes} B/param blocks"
        if deferred
        else "none"
    )

    device_memory, device_note = device_memory_bytes(cfg)
    return MemoryPlan(
        parameters=parameters,
        gradients=parameters,
        optimizer_state=optimizer_state,
        compute_copies=compute_copies,
        reference=reference,
        deferred_gradients=deferred_gradients,
        deferred_parameters=deferred_parameters,
        activations_checkpointed=activations_checkpointed,
        activations_full=activations_full,
        loss_chunk=loss_chunk,
        publication=publication,
        delta_base=publication if deltas else 0,
        activation_checkpointing=bool(p.activation_checkpointing),
        device_memory=device_memory,
        notes={
            "optimizer": optimizer_note,
            "compute": compute_note,
            "reference": reference_note,
            "deferred": deferred_note,
            "tokens": tokens_note,
            "loss": f"{chunk} x {shape.vocab_size} fp32 logits + grads, [V, D] fp32 grad",
            "device": device_note,
            "publication": publication_note,
            "delta": (
                "generation.weight_delta: held by rank 0's node's ranks together, and by each "
                "worker in /dev/shm (twice: the version served and the one it rebuilds into)"
                if deltas
                else "none (generation.weight_delta=false)"
            ),
        },
    )
