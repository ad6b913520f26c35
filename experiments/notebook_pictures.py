"""Run notebooks/maejax_demo.ipynb (not its install cell) and save its pictures for the README.

    python experiments/notebook_pictures.py --pretrain_steps=200 --diffmae_steps=200 --out=docs

Writes OUT/notebook_<n>.png, one per picture the notebook draws, in order, and
prints the parameters used. The committed notebook keeps no outputs.
"""

import argparse
import base64
import json
import os
import time

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "maejax_demo.ipynb")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain_steps", type=int, default=400)
    parser.add_argument("--diffmae_steps", type=int, default=400)
    parser.add_argument("--workdir", default="workdirs/notebook_pictures")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells = [c for c in notebook.cells if "install" not in c.metadata.get("tags", [])]
    parameters = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    chosen = {
        "PRETRAIN_STEPS": args.pretrain_steps,
        "DIFFMAE_STEPS": args.diffmae_steps,
        "WORKDIR": os.path.abspath(args.workdir),
    }
    source = "\n".join(f"{k} = {json.dumps(v)}" for k, v in chosen.items())
    notebook.cells.insert(parameters + 1, nbformat.v4.new_code_cell(source))
    start = time.time()
    NotebookClient(
        notebook, timeout=3600, kernel_name="python3", resources={"metadata": {"path": REPO}}
    ).execute()
    print(f"executed in {time.time() - start:.0f} s with {chosen}")

    os.makedirs(args.out, exist_ok=True)
    pictures = [
        o["data"]["image/png"]
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    for n, picture in enumerate(pictures):
        path = os.path.join(args.out, f"notebook_{n}.png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(picture))
        print("wrote", path)
    for c in notebook.cells:
        for o in c.get("outputs", []):
            if o.get("name") == "stdout" and ("psnr" in o["text"] or "skipping" in o["text"]):
                print(o["text"].strip()[-400:])


if __name__ == "__main__":
    main()
