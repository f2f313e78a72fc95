"""The short human report written next to every artifact (report.md) and printed by the CLI."""

from __future__ import annotations

from typing import Any

BLOCK_COLUMNS = ("index", "stage", "emb", "heads", "qk_dim", "v_dim", "mlp_dim", "tokens", "sequences", "gflops")


def structure_markdown(blocks: list[dict]) -> str:
    head = "| block | stage | EMB | heads | QK/head | V/head | MLP | tokens | seq | GFLOPs |"
    rule = "|" + "---|" * len(BLOCK_COLUMNS)
    rows = ["| " + " | ".join(str(b[c]) for c in BLOCK_COLUMNS) + " |" for b in blocks]
    return "\n".join([head, rule, *rows])


def selection_text(cfg: dict) -> str:
    """How pruning ranked chunks (manifests before the ratio rule have no ``selection``: additive)."""
    if cfg["method"] == "uniform":
        return "one width ratio for every block"
    if cfg.get("selection", "additive") == "additive":
        return f"NViT's additive score, eta {cfg['eta']:g}"
    return "importance per latency (ratio)"


def pruning_markdown(p: dict[str, Any] | None) -> list[str]:
    """NViT's parameter-redistribution view: per-block dims before -> after, and the latency check."""
    if not p:
        return []
    cfg, lat = p["config"], p["latency"]
    pair = lambda v: f"{v[0]} -> {v[1]}" if v[0] != v[1] else str(v[0])  # noqa: E731
    lines = [
        "## Pruning",
        "",
        f"- method {cfg['method']} ({selection_text(cfg)}), budget {cfg['latency']} of the predicted "
        f"{p['baseline_predicted_ms']:.3f} ms = {p['target_ms']:.3f} ms at batch {lat['batch']}; {cfg['steps']} steps, "
        f"{cfg['kd_steps']} distillation steps each, {cfg['finetune_epochs']} fine-tuning epochs",
        f"- latency at batch {lat['batch']}: predicted {p['predicted_ms']:.3f} ms ({lat['predicted_ratio']:.3f}x), "
        + (f"measured {lat['pruned']['median_ms']:.3f} ms vs unpruned {lat['unpruned']['median_ms']:.3f} ms "
           f"(**{lat['measured_ratio']:.3f}x**, median of {lat['pruned']['n']} interleaved runs, p10-p90 "
           f"{lat['pruned']['p10_ms']:.3f}-{lat['pruned']['p90_ms']:.3f} ms)" if "measured_ratio" in lat
           else "not measured (the compile was run without measuring)"),
        f"- params {p['params'][0] / 1e6:.3f} M -> {p['params'][1] / 1e6:.3f} M, matmul GFLOPs/image "
        f"{p['gflops_per_image'][0]:.4f} -> {p['gflops_per_image'][1]:.4f}; EMB {pair(p['emb'])}",
    ]
    if p.get("levers"):
        lv = p["levers"]
        lines.append(f"- predicted speed-up by lever ({p.get('precision', 'fp32')} vs the fp32 source): precision "
                     f"{lv['precision']:.2f}x, tokens {lv['tokens']:.2f}x, width {lv['width']:.2f}x = {lv['total']:.2f}x")
    if p.get("budget_checks"):
        lines.append("- on-device checks (after step: predicted -> measured ratio): " + ", ".join(
            f"{c['after']}: {c['predicted_ratio']:.3f} -> {c['measured_ratio']:.3f}" for c in p["budget_checks"]))
    if p.get("finetune"):
        last = p["finetune"][-1]
        if "test_accuracy" in last:
            lines.append(f"- fine-tuned {len(p['finetune'])} epochs: torch top-1 {last['test_accuracy']:.2f} %")
        if "test_cosine" in last:
            lines.append(f"- fine-tuned {len(p['finetune'])} epochs (feature distillation): torch cosine to the "
                         f"unpruned embedding {last['test_cosine']:.5f}")
    lines += ["", "| block | heads | QK/head | V/head | MLP | GFLOPs |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['block']} | {pair(r['heads'])} | {pair(r['qk_dim'])} | {pair(r['v_dim'])} | {pair(r['mlp_dim'])} "
              f"| {pair(r['gflops'])} |" for r in p["blocks"]]
    return lines + ["", "![per-block dims](pruning.png)", ""]


def tokens_markdown(t: dict[str, Any] | None) -> list[str]:
    """STViT's rewrite: where the generator sits and how many tokens the later blocks see."""
    if not t:
        return []
    a, b = t["generator_blocks"]
    lines = ["## Semantic tokens", ""]
    if "semantic_tokens_per_window" in t:  # Swin (tokens/stvit_swin.py)
        lines.append(f"- stage {t['stage']} (0-based): block{f' {a}' if a == b else f's {a}-{b}'} of the stage generate{'s' if a == b else ''} {t['semantic_tokens_per_window']} "
                     f"semantic tokens per window ({t['pooling']} pooling of each window, then attention to its tokens); "
                     + ("the stage's last block recovers the full grid (each window's tokens attend to its semantic "
                        "tokens; STViT-R); " if t.get("recovery") else "the later blocks and stages run on the semantic grid; ")
                     + f"graph: {t['route']}")
    else:
        lines.append(
             f"- blocks 0-{a - 1} on {t['tokens_before']} tokens; generator in blocks {a}-{b} "
             f"({t['pooling']} pooling of the patch grid to {t['semantic_tokens']} centres, then TokenCluster); "
             f"blocks {b + 1}+ on {t['tokens_after']} tokens ({t.get('prefix_tokens', 1)} prefix + {t['semantic_tokens']})")
    if t.get("finetune"):
        last = t["finetune"][-1]
        if "test_accuracy" in last:
            lines.append(f"- fine-tuned {len(t['finetune'])} epochs after the rewrite: torch top-1 {last['test_accuracy']:.2f} %")
        if "test_cosine" in last:
            lines.append(f"- fine-tuned {len(t['finetune'])} epochs after the rewrite (feature distillation): torch "
                         f"cosine to the unrewritten embedding {last['test_cosine']:.5f}")
    return lines + [""]


def int8_markdown(q: dict[str, Any] | None) -> list[str]:
    """int8: per-layer sensitivity (only that layer in float) and what the accuracy-aware fallback kept."""
    if not q or "sensitivity" not in q:
        return []
    sens, fallback = q["sensitivity"], q.get("fallback", {})
    kept = set(fallback.get("kept_float", []))
    lines = ["## int8 sensitivity", "",
             f"- {sens['measure']}; {sens['samples']} images ({sens['inputs']}); fully quantized graph: cosine "
             f"{sens['cosine_all_int8']:.5f}; {len(sens['layers'])} quantized layers, measured in {sens['seconds']} s"]
    if fallback.get("cap", 0) == 0:
        lines.append("- accuracy-aware fallback: off (cap 0)")
    elif fallback.get("kept_float"):
        tried = ", ".join(f"{a['kept']}: cosine {a['cosine']:.4f}"
                          + (f", drop {a['drop_pt']:.2f} pt" if "drop_pt" in a else "")
                          + (" (passed)" if a["passed"] else "") for a in fallback["attempts"])
        lines.append(f"- accuracy-aware fallback: the quantized graph missed the fidelity gate; kept "
                     f"**{len(kept)} of {len(sens['layers'])} layers in float**: {', '.join(fallback['kept_float'])} "
                     f"(cap {fallback['cap']}; layers kept -> {tried})")
    else:
        lines.append(f"- accuracy-aware fallback: not needed (the quantized graph passed the gate; cap {fallback['cap']})")
    lines += ["", "| rank | layer | cosine, only this layer in float | gain | kept in float |", "|---|---|---|---|---|"]
    lines += [f"| {r['rank']} | `{r['layer']}` | {r['cosine_only_this_float']:.5f} | {r['gain']:+.5f} | "
              f"{'yes' if r['layer'] in kept else ''} |" for r in sens["layers"]]
    return lines + [""]


def qat_markdown(q: dict[str, Any] | None) -> list[str]:
    """int8 quantization-aware fine-tuning: the recipe, the emulation's check, the gate before and after."""
    if not q or "qat" not in q:
        return []
    qat = q["qat"]

    def gate(g: dict[str, Any]) -> str:
        return (f"top-1 agreement {g['top1_agreement']:.3f}, cosine {g['cosine']:.5f}, relative L2 {g['rel_l2']:.3g}"
                + (f", top-1 {g['artifact_top1']:.2f} % (drop {g['drop_pt']:.2f} pt)" if "drop_pt" in g else ""))

    emu = qat["emulation_vs_onnxruntime"]
    lines = ["## int8 quantization-aware fine-tuning", "",
             f"- {qat['epochs']} epoch{'s' if qat['epochs'] != 1 else ''} on {qat['train_samples']} training images, lr {qat['lr']:g}, teacher: "
             f"{qat['teacher']}; {qat['parameters_written']} parameters written back into the Q/DQ graph "
             f"({qat['seconds']} s)",
             f"- the torch emulation of the Q/DQ graph vs ONNX Runtime before fine-tuning: relative L2 "
             f"{emu['rel_l2']:.3g} (the fp32 model's {emu['fp32_rel_l2']:.3g}; max {emu['max_ratio']:g}x that) on "
             f"{emu['inputs']}"]
    if "gate_before" in qat:
        lines += [f"- fully quantized, before QAT (PTQ): {gate(qat['gate_before'])}",
                  f"- fully quantized, after QAT: {gate(qat['gate_after'])}"]
    if "ptq_kept_float" in qat:
        after = (q.get("fallback") or {}).get("kept_float")
        before = qat["ptq_kept_float"]
        lines.append(f"- layers the accuracy-aware fallback keeps in float: PTQ alone "
                     f"{'more than its cap' if before is None else len(before)}, after QAT "
                     f"{len(after) if after is not None else 'n/a'}")
    return lines + [""]


def render_report(m: dict[str, Any]) -> str:
    src, tgt, parity = m["source"], m["target"], m["parity"]
    lines = [
        f"# deploycomp report: {src['model']} -> {tgt['target']}",
        "",
        f"- source: `{src['model']}` ({src['family']}), weights: {src.get('weights', 'from the ONNX file')}",
        f"- target: {tgt['target']} on {tgt['cpu_model']} ({tgt['cores']} cores, {tgt['threads']} threads), "
        f"{tgt['backend']} {tgt['backend_version']}",
        f"- params: {m['totals']['params'] / 1e6:.2f} M, matmul GFLOPs/image: {m['totals']['gflops_per_image']:.3f}"
        + (f", {m['totals']['artifact_bytes'] / 2**20:.2f} MiB as the runtime loads it" if "artifact_bytes" in m["totals"] else ""),
        f"- input `{m['input']['name']}` {m['input']['shape']}, output `{m['output']['name']}` {m['output']['shape']}"
        + (f" (the artifact's batch fixed to {tgt['static_batch']})" if tgt.get("static_batch") else ""),
    ]
    if "compile" in m:
        cost = m["compile"]
        lines.append(f"- compile: {cost['seconds']:.0f} s, peak memory {cost['peak_rss_mib']:.0f} MiB"
                     + ("" if cost["peak_rss_scope"] == "compile" else " (the process's, not this compile's alone)"))
    if "latency" in m:
        lat = m["latency"]
        lines.append(f"- measured latency at batch {lat.get('batch', 1)}: median {lat['median_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms "
                     f"({lat['n']} runs)")
        if "speedup_vs_fp32" in lat:
            lines.append(f"- the same graph at fp32, interleaved: median {lat['fp32']['median_ms']:.2f} ms, so the "
                         f"precision gives **{lat['speedup_vs_fp32']:.2f}x**"
                         + (" (slower: --precision fp32 would be faster here)" if lat["speedup_vs_fp32"] < 1 else ""))
    if "accuracy" in m:
        acc = m["accuracy"]
        lines.append(f"- top-1 on {acc['samples']} samples of {acc['data']}: {acc['reference']} reference "
                     f"{acc['reference_top1']:.2f} %, artifact on {tgt['target']} {acc['artifact_top1']:.2f} % "
                     f"({acc['delta_pt']:+.2f} pt)")
    if "embedding_cosine" in m:
        emb = m["embedding_cosine"]
        lines.append(f"- embedding cosine to the {emb['reference']} reference on {emb['samples']} samples of "
                     f"{emb['data']}: mean {emb['mean_cosine']:.6f}, min {emb['min_cosine']:.6f} (artifact on "
                     f"{tgt['target']})")
    if parity.get("gate") == "fidelity":
        verdict = (f"- fidelity gate vs the {parity['reference']} reference on {parity['inputs']}: top-1 agreement "
                   f"{parity['top1_agreement']:.3f} (min {parity['min_top1_agreement']}), cosine {parity['cosine']:.4f} "
                   f"(min {parity['min_cosine']}), relative L2 {parity['rel_l2']:.3g}"
                   + (f"; top-1 on {parity['accuracy_samples']} {parity['accuracy_data']} images {parity['reference_top1']:.2f} "
                      f"-> {parity['artifact_top1']:.2f} % (drop {parity['drop_pt']:.2f} pt, max {parity['max_drop_pt']})"
                      if "drop_pt" in parity else "") + " - passed")
    else:
        checks = ", ".join(f"batch {c['batch']}: {c['rel_l2']:.2e}"
                           + (f" (cosine >= {c['cosine_min']:.6f})" if "cosine_min" in c else "") for c in parity["checks"])
        what = "embedding" if parity.get("output") == "embedding" else "output"
        verdict = (f"- verification vs the {parity['reference']} reference (relative L2 of the {what} <= "
                   f"{parity['tolerance']:g}, cosine per image; seed {parity['seed']}): {checks} - passed")
    quant = m.get("quantization")
    lines += [
        verdict,
        *([f"- int8: {quant['method']}, calibrated on {quant['calibration']} ({quant['samples']} images)"
           + (f". Warning: {quant['warning']}" if "warning" in quant else "")] if quant else []),
        "",
        "## Structure",
        "",
        structure_markdown(m["structure"]["blocks"]),
        "",
        *pruning_markdown(m.get("pruning")),
        *tokens_markdown(m.get("semantic_tokens")),
        *int8_markdown(quant),
        *qat_markdown(quant),
        "## Passes",
        "",
        "| pass | modified | seconds | nodes after |",
        "|---|---|---|---|",
        *[f"| {p['pass']} | {p['modified']} | {p['seconds']} | {p['nodes']} |" for p in m["passes"]],
        "",
    ]
    return "\n".join(lines)
