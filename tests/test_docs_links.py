"""The README and the docs pages: every relative link resolves, its anchor included."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    seen: dict = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.*?)\s*$", text, re.M):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_every_relative_link_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    broken, checked = [], 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
            target = m.group(1)
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            checked += 1
            path, _, frag = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: no file {target}")
            elif frag and (dest.suffix != ".md" or frag not in _anchors(dest)):
                broken.append(f"{page.name}: no anchor {target}")
    assert checked > 20 and not broken, broken


def test_the_readme_is_a_front_door():
    """The README stays short: the two commands, install, quickstart, the API; the rest is in docs/."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 300
    for heading in ("## Fresh machine: two commands", "## Install", "## Quickstart", "## API"):
        assert heading in text, heading
