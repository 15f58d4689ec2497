"""Named mutations of peftlab's core, each with the tests that must catch it (issue 35's mutation check).

A mutation replaces one exact snippet (``old``, which must occur once) in the source of one function
(``module:qualname``) with ``new``; the plugin recompiles that function and swaps its code object in place, so
every reference to it (imports, methods, autograd Functions) runs the mutant. ``targets``: pytest node ids, the
only tests run for that mutation. ``survives``: a known gap (the suite does not catch it yet, issue number in the
reason); the runner then requires it to survive, so closing the gap flips the entry.
Add a mutation whenever a bug is fixed that the suite had missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LORA = "tests/methods/lora/test_lora.py"
VARIANTS = "tests/methods/lora/test_lora_variants.py"
MIXED = "tests/serving/test_mixed_batch.py"
COMBINE = "tests/core/test_multi_adapter.py"
FILES = "tests/persist/test_reliability.py"
FUSED = "tests/methods/lora/test_fused_layer_dropout.py"
ESTIMATE = "tests/estimator/test_estimate.py"
TRAIN_ROWS = "tests/serving/test_train_rows.py"
MANY = "tests/training/test_train_many.py"
PACK = "tests/bench/test_pack.py::test_packed_runs_of_several_methods_equal_separate_runs_with_base_dropout"


@dataclass(frozen=True)
class Mutation:
    name: str
    where: str  # "module:qualname" of a function, a method, or an autograd Function's staticmethod
    old: str
    new: str
    targets: tuple[str, ...]
    survives: str | None = None
    tags: tuple[str, ...] = field(default=())


OPS = "peftlab.backends.lora_ops"
MUTATIONS = [
    # ---- scaling ---------------------------------------------------------------------------------------
    Mutation("lora-scaling-off-by-one", "peftlab.methods.lora.config:LoraConfig.scaling",
             "else alpha / r", "else alpha / (r + 1)", ("tests/persist/test_hf_peft_interop.py::test_import_adapter_trained_by_peft_gpt2_conv1d",)),
    Mutation("rslora-ignored", "peftlab.methods.lora.config:LoraConfig.scaling",
             "alpha / math.sqrt(r) if self.use_rslora else", "alpha / r if self.use_rslora else",
             (f"{LORA}::test_rslora_bias_and_patterns",)),
    Mutation("forward-scaling-dropped", f"{OPS}:LoraLinearFunction.forward",
             "_rows(y).addmm_(xa, _as(lora_B, xa.dtype).t(), alpha=scaling)",
             "_rows(y).addmm_(xa, _as(lora_B, xa.dtype).t(), alpha=1.0)", (f"{LORA}::test_lean_autograd_matches_reference",)),
    Mutation("dropout-rescale-missing", f"{OPS}:_lora_down",
             "scaling = scaling / (1.0 - _effective_p(p))", "scaling = scaling",
             (f"{LORA}::test_lean_autograd_matches_reference", f"{LORA}::test_branch_autograd_matches_reference_and_saves_no_dropped_copy")),
    Mutation("branch-scaling-dropped", f"{OPS}:LoraBranchFunction.forward",
             ".mul(scaling)", ".mul(1.0)", (f"{LORA}::test_branch_autograd_matches_reference_and_saves_no_dropped_copy",)),
    # ---- gradients -------------------------------------------------------------------------------------
    Mutation("grad-B-unscaled", f"{OPS}:_lora_grads",
             "grad_B = _as((g_lora.t() @ xa).mul_(s), b_dtype)", "grad_B = _as((g_lora.t() @ xa), b_dtype)",
             (f"{LORA}::test_lean_autograd_matches_reference",)),
    Mutation("grad-gb-unscaled", f"{OPS}:_lora_grads",
             "gb = (g_lora @ lora_B).mul_(s)", "gb = (g_lora @ lora_B)",
             (f"{LORA}::test_lean_autograd_matches_reference",)),
    Mutation("grad-bias-halved", f"{OPS}:LoraLinearFunction.backward",
             "grad_bias = g.sum(0)", "grad_bias = g.sum(0) * 0.5", (f"{LORA}::test_lean_autograd_matches_reference",)),
    Mutation("grad-x-base-term-dropped", f"{OPS}:LoraLinearFunction.backward",
             "grad_x = torch.addmm(grad_lora_x, g, weight)", "grad_x = grad_lora_x.clone()",
             (f"{LORA}::test_lean_autograd_matches_reference",)),
    # ---- dropout masks ---------------------------------------------------------------------------------
    Mutation("dropout-rate-halved", f"{OPS}:_dropout_drop",
             "threshold = round(p * _MASK_LEVELS) - (1 << 15)", "threshold = round(p * _MASK_LEVELS / 2) - (1 << 15)",
             (f"{LORA}::test_dropout_mask_rate_reproducible_and_odd_shapes",)),
    Mutation("backward-mask-other-seed", f"{OPS}:_lora_grads",
             "drop = _dropout_drop(x2.shape, ctx.p, ctx.seed, x2.device)",
             "drop = _dropout_drop(x2.shape, ctx.p, ctx.seed + 1, x2.device)",
             (f"{LORA}::test_lean_autograd_matches_reference",)),
    Mutation("grad-A-ignores-mask", f"{OPS}:_lora_grads",
             "xin = xin.masked_fill(drop, 0)", "xin = xin", (f"{LORA}::test_lean_autograd_matches_reference",)),
    Mutation("grad-x-ignores-mask", f"{OPS}:_lora_grads",
             "grad_lora_x.masked_fill_(drop, 0)", "grad_lora_x.mul_(1)", (f"{LORA}::test_lean_autograd_matches_reference",)),
    Mutation("fused-path-drops-dropout", f"{OPS}:lora_forward",
             "slot.scaling, p,\n                                strict=", "slot.scaling, 0.0,\n                                strict=",
             (f"{FUSED}::test_fused_dropout_output_statistics_equal_torch_path_and_expectation",)),
    Mutation("fused-forward-mask-missing", "peftlab.kernels.lora:TritonLoraLinear.forward",
             "xa = thin(x2, lora_A.t(), p, seed)", "xa = thin(x2, lora_A.t(), 0.0, seed)",
             (f"{FUSED}::test_fused_dropout_output_and_grads_equal_reference_with_the_kernels_mask",)),
    # ---- DoRA norms and gradients ------------------------------------------------------------------------
    Mutation("dora-norm-cross-term", "peftlab.methods.lora.dora:lora_row_norm",
             "beta=2.0 * scaling", "beta=scaling", (f"{VARIANTS}::test_dora_output_grads_merge_equal_fp64_formula",)),
    Mutation("dora-norm-squared", "peftlab.methods.lora.dora:lora_row_norm",
             "(wn + (b * inner).sum(1)).clamp_min_(0).sqrt_()", "(wn + (b * inner).sum(1)).clamp_min_(0)",
             (f"{VARIANTS}::test_dora_output_grads_merge_equal_fp64_formula",)),
    Mutation("dora-magnitude-grad", "peftlab.methods.lora.dora:DoraScaleFunction.backward",
             "grad_m = (gy / norm.float()).to(ctx.magnitude_dtype)", "grad_m = gy.to(ctx.magnitude_dtype)",
             (f"{VARIANTS}::test_dora_output_grads_merge_equal_fp64_formula",)),
    Mutation("dora-input-grad-unscaled", "peftlab.methods.lora.dora:DoraScaleFunction.backward",
             "s = scale.to(g.dtype)", "s = torch.ones_like(scale).to(g.dtype)",
             (f"{VARIANTS}::test_dora_output_grads_merge_equal_fp64_formula",)),
    Mutation("dora-bias-grad", "peftlab.methods.lora.dora:DoraScaleFunction.backward",
             "grad_b = (g_sum * (1.0 - scale)).to(bias.dtype)", "grad_b = (g_sum * (1.0 - scale) * 0.01).to(bias.dtype)",
             (f"{VARIANTS}::test_dora_trainable_bias_equals_fp64_formula",)),
    Mutation("dora-magnitude-grad-ignores-bias", "peftlab.methods.lora.dora:DoraScaleFunction.backward",
             "gy = gy - bias.detach().float() * g_sum", "gy = gy",
             (f"{VARIANTS}::test_dora_trainable_bias_equals_fp64_formula",)),
    # ---- the memory estimator's rules ------------------------------------------------------------------------
    Mutation("estimate-dora-misses-lora-output", "peftlab.methods.lora.dora:dora_saved_bytes",
             '"y_lora": m * d_out * y_bytes', '"y_lora": 0', (f"{ESTIMATE}::test_dora_rule_matches_saved_tensors",)),
    Mutation("estimate-ignores-dora-variant", "peftlab.estimator.estimate:_method_of",
             "rules.for_config(config) if rules.for_config is not None else rules", "rules",
             (f"{ESTIMATE}::test_activation_rules_match_autograd[llama-dora-None]",)),
    Mutation("estimate-embedding-lora-rows-missed", "peftlab.methods.lora.estimate:embedding_saved",
             'rows(path) * r * graph.a)', '0)',
             (f"{ESTIMATE}::test_embedding_and_token_rules_match_autograd[llama-lora-embed]",)),
    # ---- selective checkpointing ---------------------------------------------------------------------------
    Mutation("selective-keeps-everything", "peftlab.training.memory:_keep_matmuls",
             "return CheckpointPolicy.PREFER_RECOMPUTE", "return CheckpointPolicy.MUST_SAVE",
             ("tests/training/test_memory.py::test_selective_checkpointing_same_grads_no_gemm_recompute",)),
    # ---- mixed-batch routing -----------------------------------------------------------------------------
    Mutation("router-rows-shuffled", "peftlab.serving.router:_lora_torch",
             "per_row = tables.for_router(router)[1]", "per_row = tables.for_router(router)[1].flip(0)",
             (f"{MIXED}::test_forward_rows_equal_single_adapter_runs",)),
    Mutation("router-segments-misplaced", "peftlab.serving.router:_lora_torch",
             "out3.index_add_(0, rows, delta.to(out3.dtype))", "out3.index_add_(0, rows.flip(0), delta.to(out3.dtype))",
             (f"{MIXED}::test_forward_rows_equal_single_adapter_runs", f"{MIXED}::test_cost_does_not_grow_with_the_number_of_adapters")),
    Mutation("train-rows-segments-misplaced", "peftlab.serving.train_rows:add_lora_train",
             "index_add(0, rows, delta.to(result.dtype))", "index_add(0, rows.flip(0), delta.to(result.dtype))",
             (f"{TRAIN_ROWS}::test_lora_joint_equals_separate",)),
    Mutation("param-rows-groups-misplaced", "peftlab.serving.param_rows:_place",
             "return full.index_copy(0, index, part)", "return full.index_copy(0, index.flip(0), part)",
             ("tests/serving/test_mixed_params.py::test_rows_with_expert_adapters_equal_each_row_alone[Qwen3-MoE]",)),
    Mutation("sgmv-backward-da-unscaled", "peftlab.kernels.sgmv_backward:sgmv_backward",
             "ranks, scales, a_table.dtype)", "ranks, None, a_table.dtype)",
             ("tests/kernels/test_sgmv_backward.py::test_backward_matches_reference_and_autograd_fp32",)),
    Mutation("train-rows-kernel-rows-misplaced", "peftlab.serving.train_rows:_sgmv_train",
             "local[0], max_len, perm, local[1])", "local[0], max_len, perm.flip(0), local[1])",
             ("tests/kernels/test_sgmv_backward.py::test_mixed_training_batch_through_the_kernels_equals_the_torch_path",)),
    Mutation("train-rows-own-length-ignored", "peftlab.serving.train_rows:_own_length",
             "if own is not None and xs.dim() == 3 and own < xs.shape[1]:", "if False:",
             (f"{MANY}::test_packed_jobs_equal_each_job_alone",)),
    Mutation("train-many-clipping-ignored", "peftlab.training.many:train_many",
             'r.max_grad_norm if r.max_grad_norm else float("inf")', 'float("inf")',
             (f"{MANY}::test_one_job_equals_a_hand_written_loop",)),
    Mutation("train-many-schedule-flat", "peftlab.training.many:Recipe.factor",
             "return max(0.0, 1.0 - done)", "return 1.0", (f"{MANY}::test_one_job_equals_a_hand_written_loop",)),
    Mutation("base-dropout-global-stream", "peftlab.serving.base_rows:_segments",
             "with on_stream(gen):", "with on_stream(None):", (PACK,)),
    Mutation("base-attention-dropout-global-stream", "peftlab.serving.base_rows:_attention",
             "with on_stream(gen):", "with on_stream(None):", (PACK,)),
    Mutation("pack-rng-state-not-replayed", "peftlab.training.many:_add_jobs",
             "gen.set_state(job.rng_state)", "pass", (PACK,)),
    # ---- combine modes -------------------------------------------------------------------------------------
    Mutation("combine-linear-ignores-weights", "peftlab.persist.combine:combine",
             "b = torch.cat([w * f[2] * f[1].detach().float()", "b = torch.cat([f[2] * f[1].detach().float()",
             (f"{COMBINE}::test_cat_and_linear_are_exact",)),
    Mutation("combine-params-ignore-weights", "peftlab.persist.combine:_combine_param",
             "b = torch.cat([w * f[2] * f[1].detach().float()", "b = torch.cat([f[2] * f[1].detach().float()",
             ("tests/methods/lora/test_lora_params.py::test_combine_expert_adapters_is_the_weighted_sum_of_updates",)),
    Mutation("combine-svd-ignores-weights", "peftlab.persist.combine:combine_deltas",
             "return (w * stack).sum(0)", "return stack.sum(0)", (f"{COMBINE}::test_svd_in_half_precision",)),
    Mutation("ties-sign-flipped", "peftlab.persist.combine:combine_deltas",
             "torch.where(stack.sum(0) >= 0, 1.0, -1.0)", "torch.where(stack.sum(0) >= 0, -1.0, 1.0)",
             (f"{COMBINE}::test_ties_and_magnitude_prune_equal_hf_peft",)),
    Mutation("trim-keeps-smallest", "peftlab.persist.combine:trim",
             ".topk(k).indices", ".topk(k, largest=False).indices", (f"{COMBINE}::test_ties_and_magnitude_prune_equal_hf_peft",)),
    Mutation("dare-not-rescaled", "peftlab.persist.combine:drop",
             "return delta * keep / density", "return delta * keep", (f"{COMBINE}::test_dare_is_seeded_and_unbiased",)),
    # ---- atomic files and locks -------------------------------------------------------------------------------
    Mutation("write-in-place-no-rename", "peftlab.util.files:FolderWriter._write",
             "write(tmp)\n    os.chmod(tmp, _umask_mode())\n    os.replace(tmp, target)",
             "write(str(target))\n    os.chmod(target, _umask_mode())",
             (f"{FILES}::test_kill_9_mid_save_leaves_old_or_new_adapter", f"{FILES}::test_concurrent_saves_into_one_folder_never_mix")),
    Mutation("lock-is-a-no-op", "peftlab.util.files:FolderWriter.__enter__",
             "fcntl.flock(fd, fcntl.LOCK_EX)", "fcntl.LOCK_EX", (f"{FILES}::test_concurrent_saves_into_one_folder_never_mix",)),
    Mutation("umask-ignored", "peftlab.util.files:FolderWriter._write",
             "os.chmod(tmp, _umask_mode())", "os.chmod(tmp, 0o600)", (f"{FILES}::test_saved_files_honour_the_umask",)),
]
