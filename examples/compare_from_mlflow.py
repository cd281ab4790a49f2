"""The seed's comparison printout — prompt, tokens, cost and satisfaction per variant — read back
from MLflow, where abproxy's flusher wrote it.

    python examples/compare_from_mlflow.py [EXPERIMENT] [--tracking-uri sqlite:///mlflow.db]
"""

from __future__ import annotations

import argparse

import mlflow


def compare(experiment: str) -> str:
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string="tags.`abproxy.role` = 'variant' and tags.`abproxy.current` = 'true'",
        output_format="list",
    )
    lines = [f"=== {experiment}: which prompt did better? ==="]
    for run in sorted(runs, key=lambda r: r.data.tags["abproxy.variant"]):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        marker = "  <- winner" if tags.get("abproxy.winner") == "true" else ""
        prompt = params.get("system_prompt") or params.get("user_template") or "(client's own prompt)"
        satisfaction = metrics.get("feedback.satisfaction.mean")
        lines += [
            f"\n[{tags['abproxy.variant']}]{' (control)' if tags.get('abproxy.control') == 'true' else ''}{marker}",
            f"  prompt:        {prompt[:90]}",
            f"  model:         {params.get('model')}",
            f"  requests:      {metrics.get('requests', 0):.0f}   error rate: {metrics.get('error_rate', 0):.1%}",
            f"  tokens/req:    {metrics.get('total_tokens_mean', float('nan')):.1f}",
            f"  cost/req:      ${metrics.get('cost_usd_mean', float('nan')):.6f}   total: ${metrics.get('cost_usd_sum', 0):.4f}",
            f"  satisfaction:  {satisfaction:.2f}" if satisfaction is not None else "  satisfaction:  -",
        ]
        if "feedback.satisfaction.p_value" in metrics:
            lines.append(
                f"  vs control:    lift {metrics.get('feedback.satisfaction.lift', 0):+.1%}, "
                f"p = {metrics['feedback.satisfaction.p_value']:.3g}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default="translation")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    args = parser.parse_args()
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    print(compare(args.experiment))
