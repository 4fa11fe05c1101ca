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
