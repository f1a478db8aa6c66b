"""No function in src/ longer than a screen (60 lines)."""

import ast
import re
from pathlib import Path

import defungi

PACKAGE = Path(defungi.__file__).parent
MAX_LINES = 60


def test_no_function_over_a_screen():
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append(f"{f.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not found


# Every file a command writes goes through utils.atomic_write_binary (a unique temporary name, then a
# rename); these are the only other writes, each with its reason.
WRITES = re.compile(
    r"open\([^)]*['\"](w|wb|a|ab|w\+|r\+)['\"]|\.savefig\(|np\.save\(|np\.savez|torch\.save\(|\.write_text\(|"
    r"\.write_bytes\(|onnx\.save\(|\.tofile\(|open_memmap\("
)
ALLOWED = {
    ("utils.py", "os.fdopen(fd"),  # the atomic writer itself
    ("serve/web.py", "paths[i].write_bytes(data)"),  # uploads, into a TemporaryDirectory of the request
    ("data/scan.py", "open(part,"),  # the resumable download (.part), under the fetch's lock
    ("data/store.py", "open_memmap(tmp,"),  # a store's scratch file (mkstemp), renamed into place by a put
    ("serve/export.py", "onnx.save(graph, str(tmp))"),  # mkstemp, renamed once onnxruntime agrees with torch
}
FIXED_TEMPORARY = re.compile(r"""["'][\w{}.-]*\.(tmp|part)(\.[\w{}]+)*["']""")  # e.g. f".{stem}.tmp.png"


def test_every_write_is_atomic_under_a_unique_temporary_name():
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        name = str(f.relative_to(PACKAGE))
        for number, line in enumerate(f.read_text().splitlines(), 1):
            if WRITES.search(line) and "atomic_write_binary(" not in line:
                if not any(name == where and snippet in line for where, snippet in ALLOWED):
                    found.append(f"{name}:{number}: {line.strip()}")
            if FIXED_TEMPORARY.search(line) and not re.search(r"mkstemp|mkdtemp|glob\(|suffix=|\.part\"\)", line):
                found.append(f"{name}:{number}: a fixed temporary name: {line.strip()}")
    assert not found, "\n".join(found)
