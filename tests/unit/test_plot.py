"""`moca plot`: a PNG of the runs' curves (one panel per logged quantity), from metrics.jsonl as the
trainers write it (a line cut by a kill is left out); a folder without metrics is a one-line error."""

import json

from PIL import Image

from megatron_moca.cli import main


def write_run(folder, steps, partial=False):
    folder.mkdir()
    with open(folder / "metrics.jsonl", "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": 10 - s * 0.1, "mlm_loss": 9 - s * 0.1, "mae_loss": 2.0,
                                "lr": 1e-4 * s, "grad_norm": 1.5, "tokens_per_s_per_gpu": 100.0 + s,
                                "skipped_samples": {"bad_json": 1}}) + "\n")
        if partial:
            f.write('{"step": 99, "loss"')
    return str(folder)


def test_plot_draws_every_panel_for_every_run(tmp_path, capsys):
    a = write_run(tmp_path / "a", range(1, 11))
    b = write_run(tmp_path / "b", range(1, 6), partial=True)
    out = tmp_path / "curves.png"
    assert main(["plot", a, b, "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000
    with Image.open(out) as img:  # 6 panels (loss, 2 parts, grad_norm, lr, tokens/s): 3 columns x 2 rows
        assert img.format == "PNG" and img.size == (1200, 640)


def test_plot_names_a_folder_without_metrics(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == f"moca: error: {tmp_path}: no metrics.jsonl (not a moca pretrain / " \
                                              "finetune run directory)"


def test_metrics_records_are_strict_json_without_nan(tmp_path):
    """A record's non-finite number (a gradient norm the update did not report) is written as null: JSON has no
    NaN, and strict readers refuse a file that holds one."""
    import json
    import math

    from megatron_moca.training.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), 0)
    writer.write({"step": 1, "loss": 2.5, "grad_norm": float("nan"), "mfu": None,
                  "skipped_samples": {"bad_image": 1, "odd": float("inf")}})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert record == {"step": 1, "loss": 2.5, "grad_norm": None, "mfu": None,
                      "skipped_samples": {"bad_image": 1, "odd": None}}
    assert not math.isnan(record["loss"])
