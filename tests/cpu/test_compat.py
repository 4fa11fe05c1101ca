"""compat.py: every process-global patch is listed there, its target exists in the installed torch and
megatron-core, it applies once, and no other module of the package patches anything."""

import ast
import os
import subprocess
import sys

from helpers import REPO, child_env

PACKAGE = os.path.join(REPO, "megatron_moca")


def test_every_listed_patch_applies_to_the_installed_versions_and_only_once():
    code = """
import json, torch, megatron.core
from megatron_moca import compat
compat.quiet_megatron_logs()
compat.adapt_megatron_to_cpu()
compat.route_megatron_rotary(); compat.route_megatron_rotary()
compat.quiet_default_tp_group()
compat.raise_dynamo_cache_limit(64)
compat.tie_helpers_to_this_process()
from megatron.core.transformer import attention
from megatron.core.tensor_parallel import layers
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
import torch._dynamo
print(json.dumps({"applied": compat.applied(), "version": compat.megatron_version(),
  "rotary": getattr(attention.apply_rotary_pos_emb, "_moca_half_rotary", False),
  "tp": getattr(layers.get_tensor_model_parallel_group_if_none, "_moca_quiet", False),
  "writer": hasattr(fa.FileSystemWriterAsync.write_preloaded_data, "__wrapped__"),
  "queue": fa._get_write_results_queue is compat._megatron_results_queue,
  "cache": torch._dynamo.config.cache_size_limit, "cpu": torch.empty(1, device="cuda").device.type}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    from megatron_moca import compat

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["applied"] == [p.name for p in compat.PATCHES]  # every listed patch, each recorded once
    assert compat.MEGATRON_TESTED[0] <= tuple(out["version"]) <= compat.MEGATRON_TESTED[1]
    assert out["rotary"] and out["tp"] and out["writer"] and out["queue"]
    assert out["cache"] >= 64 and out["cpu"] == "cpu"


def test_a_gated_patch_stays_off_on_an_untested_megatron(monkeypatch, caplog):
    from megatron_moca import compat

    monkeypatch.setattr(compat, "megatron_version", lambda: (0, 99))
    monkeypatch.setattr(compat, "_applied", set())
    compat.route_megatron_rotary()
    assert compat.applied() == [] and "megatron-core (0, 99) is outside the tested" in caplog.text


def _patching_statements(path):
    """Assignments to attributes of imported torch / megatron / transformers modules, and global
    warnings / logging filters, in one source file."""
    tree = ast.parse(open(path).read())
    foreign = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            foreign |= {(a.asname or a.name).split(".")[0] for a in node.names
                        if a.name.split(".")[0] in ("torch", "megatron", "transformers")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("torch", "megatron",
                                                                                        "transformers"):
            foreign |= {a.asname or a.name for a in node.names}
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            root = target
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(target, ast.Attribute) and isinstance(root, ast.Name) and root.id in foreign:
                found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("filterwarnings", "simplefilter", "addFilter") or \
                isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and \
                node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in foreign:
            found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return found


def test_no_module_but_compat_patches_torch_megatron_or_the_warning_filters():
    found = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != os.path.join(PACKAGE, "compat.py"):
                found += _patching_statements(path)
    assert found == []
    assert _patching_statements(os.path.join(PACKAGE, "compat.py"))  # the scan sees compat's own patches
