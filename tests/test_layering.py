"""The package's import graph follows docs/design.md section 3: no module imports a part above it,
moba_cp never looks its own modules up by name, and the CPU compat is switched on in one place."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "moba_cp"

#: docs/design.md section 3: a part may import parts of a lower or equal rank, never a higher one.
#: data/ sits beside megatron/ (rank 3) but neither may import the other.
RANK = {"config": 0, "model_sizes": 0, "import_notices": 0, "__init__": 1, "ops": 1, "selfcheck": 1, "parallel": 2,
        "megatron": 3, "data": 3, "train": 4, "eval": 5, "analysis": 5, "hf": 6, "experiments": 7, "cli": 8}

#: The deliberate exceptions, each with its reason (docs/design.md section 3). Nothing may be added
#: here without one.
KNOWN_UPWARD = {
    # recipe validation reads the kernels' input limits (plain data) and the all-to-all's head
    # rules, so a recipe is refused before any process starts for what the GPU would refuse
    ("moba_cp.config", "moba_cp.ops"),
    ("moba_cp.config", "moba_cp.parallel"),
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        yield name.removesuffix(".__init__") if name != "moba_cp.__init__" else name, path


def _imports(name: str, path: Path):
    """Every moba_cp module imported anywhere in the file (top level or inside functions)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base]
        else:
            continue
        for t in targets:
            if t == "moba_cp" or t.startswith("moba_cp."):
                yield t, node.lineno


def test_no_module_imports_a_part_above_it():
    upward, unranked = set(), []
    for name, path in _modules():
        src = _part(name)
        if src not in RANK:
            unranked.append(name)
            continue
        for target, line in _imports(name, path):
            dst = _part(target)
            if dst not in RANK:
                unranked.append(target)
            elif RANK[dst] > RANK[src] or ({src, dst} == {"data", "megatron"}):
                upward.add((name, ".".join(target.split(".")[:2])))
    assert not unranked, f"modules outside docs/design.md's layers: {sorted(set(unranked))}"
    new = upward - KNOWN_UPWARD
    assert not new, f"imports running up the layers (docs/design.md section 3): {sorted(new)}"


def test_data_does_not_import_evaluation_or_megatron_glue():
    for name, path in _modules():
        if _part(name) == "data":
            bad = [t for t, _ in _imports(name, path) if _part(t) in ("eval", "megatron", "train")]
            assert not bad, (name, bad)


def test_no_lookup_of_own_modules_by_name():
    """moba_cp imports its own modules; it never looks them up with importlib (the graph would be
    invisible to readers and tools)."""
    offenders = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("import_module", "find_spec") and node.args:
                arg = node.args[0]
                text = ast.unparse(arg)
                if "moba_cp" in text:
                    offenders.append(f"{name}:{node.lineno}: {node.func.attr}({text})")
    assert not offenders, offenders


def test_cpu_compat_is_switched_on_in_exactly_one_place():
    calls = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("compat_cpu.activate", "activate") \
                    and name != "moba_cp.megatron.compat_cpu":
                calls.append(name)
    assert calls == ["moba_cp.megatron.parallel_init"], calls


#: The only imports allowed inside a function (docs/design.md section 3), each an optional
#: dependency or a headless set-up: (importing module, imported module).
LAZY_IMPORTS = {
    ("moba_cp.megatron.core_attention", "megatron.core.extensions.transformer_engine"),  # optional: TE
    ("moba_cp.megatron.core_attention", "transformer_engine"),  # optional: TE
    ("moba_cp.data.tokenizers", "tokenizers"),  # optional: HuggingFace tokenizers
    ("moba_cp.train.metrics", "torch.utils.tensorboard"),  # optional at run time: events off without it
    ("moba_cp.eval.plots", "matplotlib"),  # headless: Agg is selected before pyplot is imported
    ("moba_cp.eval.plots", "matplotlib.pyplot"),
    ("moba_cp.ops.moba.triton_common", "triton.runtime"),  # the interpreter patch, only under TRITON_INTERPRET=1
    # the 'export' extra (transformers, safetensors): `moba-cp export` and `eval needle --generate` need it,
    # nothing else does; the exported modeling files import transformers at their top
    ("moba_cp.hf.export", "moba_cp.hf.configuration_moba"),
    ("moba_cp.hf.export", "moba_cp.hf.modeling_moba"),
    ("moba_cp.hf.export", "transformers"),
    ("moba_cp.hf.export", "safetensors.torch"),
    ("moba_cp.hf.needle_generate", "transformers"),
}


def test_imports_are_at_the_top():
    """Every dependency shows in a module's header; an import inside a function is an optional
    dependency listed in LAZY_IMPORTS, never one of moba_cp's own modules."""
    found = []
    for name, path in _modules():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    targets = ["." * node.level + (node.module or "")]
                else:
                    continue
                found += [f"{name}:{node.lineno}: {t}" for t in targets if (name, t) not in LAZY_IMPORTS]
    assert not found, f"imports inside functions (move them to the top, docs/design.md section 3): {found}"


def test_the_exported_modeling_files_import_only_the_ops():
    """moba_cp/hf/{modeling,configuration}_moba.py are copied into every exported model: they may
    use moba_cp's single-device ops, never Megatron-Core or the training code."""
    for name in ("modeling_moba", "configuration_moba"):
        path = PKG / "hf" / f"{name}.py"
        targets = {t for t, _ in _imports(f"moba_cp.hf.{name}", path)}
        assert all(t.startswith("moba_cp.ops.") or t == "moba_cp.hf.configuration_moba" for t in targets), targets
        tops = {a.name.split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import)
                for a in n.names}
        tops |= {(n.module or "").split(".")[0] for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.ImportFrom) and not n.level}
        assert tops <= {"__future__", "weakref", "torch", "transformers", "moba_cp"}, (name, tops)
