import subprocess
import sys


def test_import_does_not_pull_gpu_or_megatron_packages():
    code = ("import sys, megatron_moca, megatron_moca.cli, megatron_moca.config, megatron_moca.errors\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformer_engine', 'flash_attn', 'megatron', 'apex')"
            " or m.startswith('nvidia.dali')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_help_lists_contract_commands():
    proc = subprocess.run([sys.executable, "-m", "megatron_moca.cli", "convert", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0
    for name in ("hf-to-mcore", "mcore-to-hf", "verify"):
        assert name in proc.stdout


def test_cli_help_lists_the_stage1_and_demo_commands():
    proc = subprocess.run([sys.executable, "-m", "megatron_moca.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("pretrain", "demo", "convert", "data", "env"):
        assert name in proc.stdout


def test_moca_env_reports_the_choices_a_run_would_make_without_importing_gpu_packages():
    code = ("import sys\nfrom megatron_moca.cli import main\nrc = main(['env'])\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformer_engine', 'flash_attn', 'apex')"
            " or m.startswith('nvidia.dali')]\nprint('imported:', bad)\nsys.exit(rc or (1 if bad else 0))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())
    for key in ("torch", "megatron-core", "gpu", "attention_backend(auto)", "swiglu", "image_pipeline(auto)"):
        assert key in lines, (key, proc.stdout)
    assert lines["imported:"].strip() == "[]"
