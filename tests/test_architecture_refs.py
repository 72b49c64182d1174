"""ARCHITECTURE.md names code as `path.rs::Type::function`: every such name
must exist, so that the "Where does it happen" index cannot drift from the
code (issue #18). Pure text check over the repository; no Postern runs."""

import re

from postern_harness import REPO

REF = re.compile(r"`([A-Za-z0-9_./-]+\.rs)((?:::[A-Za-z_][A-Za-z0-9_]*)*)`")
ITEM = r"\b(fn|struct|enum|trait|const|static|type|mod)\s+{}\b"


def defined_in_impl(src, ty, name):
    """Whether `fn name` stands in an `impl ... Ty` block of `src`."""
    for im in re.finditer(r"^impl[^\n]*\b" + re.escape(ty) + r"\b[^\n]*\{", src, re.M):
        rest = src[im.end():]
        end = re.search(r"^(impl|pub fn|fn|pub struct|struct|enum|pub enum|mod|#\[cfg\(test\)\])",
                        rest, re.M)
        block = rest[:end.start() if end else len(rest)]
        if re.search(r"\bfn\s+" + re.escape(name) + r"\b", block):
            return True
    return False


def test_every_code_reference_in_architecture_exists():
    doc = (REPO / "ARCHITECTURE.md").read_text()
    refs = sorted(set(REF.findall(doc)))
    assert len(refs) > 100, "the index has gone missing"
    problems = []
    for path, rest in refs:
        f = REPO / path
        if not f.exists():
            problems.append(f"{path}: no such file")
            continue
        names = [n for n in rest.split("::") if n]
        if not names:
            continue
        src = f.read_text()
        if not re.search(ITEM.format(re.escape(names[-1])), src):
            problems.append(f"{path}{rest}: {names[-1]} is not defined there")
        elif len(names) == 2 and not defined_in_impl(src, names[0], names[1]):
            problems.append(f"{path}{rest}: {names[1]} is not a method of {names[0]}")
    assert not problems, "\n".join(problems)
