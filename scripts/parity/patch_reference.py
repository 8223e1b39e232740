"""Write the 2026-04-27 record's train_gpt.py with the golf bench's hook lines added, beside the hooks and the FA3
stand-in, so that it runs on the bench (docs/parity.md, "How the reference runs on the golf bench").

    python scripts/parity/patch_reference.py RECORD_SCRIPT OUT_DIR

The record's own lines are kept as they are: each hook is one added line, placed after a statement found by its
syntax (an assignment to a name, a loop over a name) inside a named function, so a reformatted copy still patches
and a different script fails with a line that names what is missing. The knobs the hooks read are all off by default
(ref_hooks.py); run_ref.sh sets them. Never commit the record's script or the patched copy.
"""

import argparse
import ast
import hashlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the record's file as published (records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611)
RECORD_SHA256 = "454f710d174be80f4603069ca952833d694f60d1d34c0c25703528323bc8878b"
MODULE = "<module>"
MODULES = ("ref_hooks.py", "flash_attn_interface.py")  # copied beside the patched script


@dataclass(frozen=True)
class Hook:
    function: str  # a top-level function of the record, or MODULE
    kind: str  # "assign": after the assignment to `name`; "loop": after the for loop whose iterable uses `name`;
    # "first": before the module's first statement; "main": before `if __name__ == "__main__":`
    name: str
    line: str


HOOKS = (
    Hook(MODULE, "first", "", "import ref_hooks as _bench  # the golf bench's knobs (added by patch_reference.py)"),
    Hook(MODULE, "main", "", "_bench.install(globals())"),
    Hook(
        "train_model", "assign", "warmup_cu_buckets", "warmup_cu_buckets = _bench.warmup_cu_buckets(warmup_cu_buckets)"
    ),
    Hook("train_model", "loop", "initial_optimizer_states", "_bench.after_warmup_restore(optimizers)"),
    Hook(
        "train_model",
        "assign",
        "should_validate",
        "should_validate = _bench.should_validate(should_validate, last_step)",
    ),
    Hook(
        "train_and_eval", "assign", "eval_model", "_bench.score_loaded(h, device, val_data, eval_model, ttt_eval_only)"
    ),
    Hook("train_and_eval", "assign", "warmup_bszes", "warmup_bszes = _bench.ttt_warmup_sizes(warmup_bszes)"),
    Hook(
        "train_and_eval",
        "assign",
        "fwd_ttt_compiled",
        "fwd_ttt_compiled = _bench.ttt_forward(fwd_ttt_compiled, _fwd_ttt_inner)",
    ),
)


class PatchError(Exception):
    pass


def is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"'


def matches(node: ast.AST, hook: Hook) -> bool:
    if hook.kind == "assign" and isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == hook.name for t in node.targets)
    if hook.kind == "loop" and isinstance(node, ast.For):
        return any(isinstance(n, ast.Name) and n.id == hook.name for n in ast.walk(node.iter))
    return False


def where(tree: ast.Module, lines: list[str], hook: Hook) -> tuple[int, int]:
    """(the 0-based line to insert before, the indentation) for one hook; PatchError if its place is not unique."""
    if hook.kind == "first":
        return tree.body[0].lineno - 1, 0
    if hook.kind == "main":
        guards = [n for n in tree.body if is_main_guard(n)]
        if len(guards) != 1:
            raise PatchError(f'{len(guards)} `if __name__ == "__main__":` blocks at the top level, expected 1')
        return guards[0].lineno - 1, 0
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == hook.function]
    if len(functions) != 1:
        raise PatchError(f"no single top-level function {hook.function}() ({len(functions)} found)")
    found = [n for n in ast.walk(functions[0]) if matches(n, hook)]
    what = "assignment to" if hook.kind == "assign" else "for loop over"
    if len(found) != 1:
        raise PatchError(f"{len(found)} {what} `{hook.name}` in {hook.function}(), expected 1")
    node = found[0]
    first = lines[node.lineno - 1]
    if len(first) - len(first.lstrip()) != node.col_offset:
        raise PatchError(f"the {what} `{hook.name}` in {hook.function}() shares its line with another statement")
    return node.end_lineno, node.col_offset


def patch(source: str) -> tuple[str, list[str]]:
    """The record's source with the hook lines added, and one line per hook saying where it went."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise PatchError(f"not Python: {e}") from None
    lines = source.splitlines(keepends=True)
    places = [(*where(tree, lines, hook), hook) for hook in HOOKS]
    report = []
    for at, indent, hook in sorted(places, key=lambda p: p[0], reverse=True):  # bottom up: earlier places stay put
        lines.insert(at, " " * indent + hook.line + "\n")
        report.append(f"{hook.function}: after the record's line {at}: {hook.line}")
    patched = "".join(lines)
    ast.parse(patched)
    return patched, report[::-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record_script", type=Path, help="the record's train_gpt.py (its folder holds the tokenizer)")
    parser.add_argument("out_dir", type=Path, help="where the patched train_gpt.py and its two modules go")
    args = parser.parse_args(argv)
    try:
        source = args.record_script.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"patch_reference: RECORD_SCRIPT {args.record_script}: {e}", file=sys.stderr)
        return 2
    try:
        patched, report = patch(source)
    except PatchError as e:
        print(
            f"patch_reference: RECORD_SCRIPT {args.record_script}: {e}; is it the 2026-04-27 record's?", file=sys.stderr
        )
        return 2
    if hashlib.sha256(source.encode()).hexdigest() != RECORD_SHA256:
        print(f"patch_reference: note: {args.record_script} differs from the published record; patched by syntax")
    if args.out_dir.resolve() == args.record_script.resolve().parent:
        print(
            f"patch_reference: OUT_DIR {args.out_dir} holds the record's script; choose another folder", file=sys.stderr
        )
        return 2
    taken = [name for name in ("train_gpt.py", *MODULES) if (args.out_dir / name).exists()]
    if taken:  # never overwritten: OUT_DIR might be a checkout (its own train_gpt.py)
        print(f"patch_reference: OUT_DIR {args.out_dir} already holds {taken[0]}; choose a new folder", file=sys.stderr)
        return 2
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "train_gpt.py").write_text(patched, encoding="utf-8")
        for module in MODULES:
            shutil.copyfile(HERE / module, args.out_dir / module)
    except OSError as e:  # a file where the folder should be, or one above it
        print(f"patch_reference: OUT_DIR {args.out_dir}: {e}", file=sys.stderr)
        return 2
    print("\n".join(report))
    print(f"patch_reference: wrote {args.out_dir / 'train_gpt.py'} ({len(report)} lines added)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
