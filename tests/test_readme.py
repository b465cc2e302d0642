"""The README is what users read first: every section a file points to exists, and the commands it names exist."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_headings():
    with open(os.path.join(ROOT, "README.md")) as f:
        return [line.lstrip("#").strip() for line in f if line.startswith("#")]


def pointers():
    """(file, section) for every pointer to a README section (README followed by the quoted section name, also with a
    comma or "'s" between them) in the repository's code, its help strings (escaped quotes) included."""
    found = []
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))
    files += glob.glob(os.path.join(ROOT, "*", "*.sh"))
    for path in files:
        if os.sep + ".venv" in path or path == os.path.abspath(__file__):
            continue
        with open(path) as f:
            text = re.sub(r"\n\s*#", " ", f.read())  # a reference may wrap across comment lines
        text = " ".join(text.replace('\\"', '"').split())
        for section in re.findall(r'README(?:\'s|,)? "([^"]+)"', text):
            found.append((os.path.relpath(path, ROOT), section))
    return found


def test_every_readme_section_a_file_points_to_exists():
    headings = readme_headings()
    found = pointers()
    assert len(found) > 10  # the search finds the references (it can fail)
    missing = [(f, s) for f, s in found
               if not any(h == s or h.startswith(s + " ") or h.startswith(s + ":") for h in headings)]
    assert not missing, missing


def test_bring_your_own_teacher_names_its_flags():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Bring your own teacher"):]
    section = section[:section.index("\n## ", 1)]
    for flag in ("--teacher", "--teacher_heads", "--teacher_mean", "--teacher_std", "--layers", "--heads"):
        assert flag + " " in section or flag + "`" in section, flag
