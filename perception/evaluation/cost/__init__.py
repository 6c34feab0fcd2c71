"""Compute cost of image backbones against the number of tokens: latency, peak memory, FLOPs.

The study tests the claim "attention cost grows quadratically with the number of tokens; state space
models (Mamba) grow linearly". `cost_study` measures each model at several resolutions (tokens =
(resolution / patch)^2), fits the exponent k of cost ~ tokens^k in log-log with a bootstrap interval, and
finds the token count from which pure Mamba is faster than ViT. The essay's published table
(`ESSAY_TABLE`) is quoted beside it, not computed.

Models (`default_cost_models`), all at one width and depth, batch 1:
  - vit:           ViT with the fused attention kernel (`F.scaled_dot_product_attention`), as trained.
  - vit_explicit:  the same ViT, same weights, with explicit softmax attention, which materialises the
                   (T, T) attention matrix per head. Fused and explicit do the same arithmetic; only the
                   memory they hold (and how fast they run) differs, so "memory scales like compute" can
                   hold for one and not the other.
  - mamba_hybrid:  Mamba blocks, then a minority of attention blocks.
  - mamba:         pure Mamba (attn_layers=0).

What each number is:
  - latency: wall time of one forward under `torch.inference_mode`. At each resolution the models are
    timed together in alternating short blocks (`time_interleaved`): rounds of one block per model, in a
    seeded random order, each block a `timeit` run of enough forwards to fill about 50 ms (CUDA
    synchronised at both ends), after one untimed warm-up forward each. A row's latency is the 20th
    percentile of its blocks (`LATENCY_QUANTILE`): load from other processes only ever lengthens a block,
    so the fastest blocks are the least disturbed. The median and quartiles are kept as the spread, and the
    20th percentile gets a bootstrap interval.
  - contention: during every block, this process's CPU time against its threads' wall time (`own_cpu`)
    and the CPU time every other process used, as a share of the machine (`others_cpu`, from
    /proc/stat); on CUDA, the other processes NVML sees on the GPU. The rows carry them, `busiest` names
    the worst, and the verdict on the cost claim is inconclusive where the machine was busy.
  - peak memory: CUDA's `max_memory_allocated` above the baseline; on CPU, torch.profiler's record of every
    c10 allocator alloc/free during one forward, and the peak of their running sum. Both count activations
    and workspaces only (the weights and the input exist before the forward starts). One measurement: on
    CPU the same forward allocates the same bytes every time, so there is no spread to resample.
  - FLOPs: COUNTED, not measured (context only): `torch.utils.flop_counter.FlopCounterMode` over one
    forward, plus our own count of the selective scan, 9*B*L*D*N per scan (the counter sees at most the
    scan's output contraction, and none of its recurrence).
  - attention entries: the attention-matrix entries an explicit implementation would materialise. The fused
    kernel does not materialise them.

Exponents: least squares of log(cost) on log(tokens), over the upper part of the sweep (tokens >=
`fit_min_tokens`, where the leading term dominates the per-token and fixed costs) and over the whole sweep.
A model's latency exponent is fitted from its rows' 20th percentiles; its interval is a percentile
bootstrap that redraws the block times within every token count and refits. The gap between two models'
exponents is fitted from their per-round ratios (`latency_ratio_exponent`): the two blocks of a round ran
back to back, so a slowdown that lasts a round cancels in the ratio, where a slowdown between token counts
would otherwise bend each model's own fit.
"""

# One file per job (essay, flops, memory, timing, fits, sweep); the public names stay here, where callers
# find them.
from perception.evaluation.cost.essay import (  # noqa: F401
    ESSAY_PATCH_SIZE,
    ESSAY_TABLE,
    EssayRow,
    essay_rows,
)
from perception.evaluation.cost.fits import (  # noqa: F401
    COUNTED,
    DETERMINISTIC,
    Exponent,
    fit_exponent,
    latency_exponent,
    loglog_slopes,
    resample_medians,
    resample_quantiles,
)
from perception.evaluation.cost.flops import (  # noqa: F401
    attention_entries,
    count_flops,
    model_flops,
    scan_flops,
)
from perception.evaluation.cost.memory import (  # noqa: F401
    CPU_MEMORY_METHOD,
    CUDA_MEMORY_METHOD,
    peak_memory_mb,
)
from perception.evaluation.cost.sweep import (  # noqa: F401
    CPU_RESOLUTIONS,
    GPU_RESOLUTIONS,
    LATENCY_QUANTILE,
    Busiest,
    CostRow,
    CostStudy,
    Crossover,
    ModelFit,
    busiest,
    cost_study,
    default_cost_models,
    default_resolutions,
    find_crossover,
    latency_ratio_exponent,
    measure_resolution,
    study_input,
    summarise,
)
from perception.evaluation.cost.timing import (  # noqa: F401
    BLOCK_S,
    Contention,
    ContentionMeter,
    Interleaved,
    time_interleaved,
    torch_threads,
)
