#!/usr/bin/env python
"""Extract the weights of OpenAI's released CLIP TorchScript archive (e.g. ViT-B-16.pt) into a weights-only file.

OpenAI distributes CLIP as TorchScript archives, not plain tensor files: a weights-only loader cannot take
them as weights (torch's `torch.load` hands them to `torch.jit.load` with a warning and returns a module). This script opens the archive with `torch.jit.load` (TorchScript, not pickle),
takes its state dict, drops the three non-weight entries OpenAI's archives carry (input_resolution,
context_length, vocab_size; open_clip's `build_model_from_openai_state_dict` drops the same) and the text
tower's causal `attn_mask` if present (open_clip rebuilds it; it is no weight), casts the fp16
weights to float32 and saves a plain dict of tensors that loads with `weights_only=True`.

Then    vilseg eval --model ViT-B-16-quickgelu --pretrained OUT ...
(OpenAI's weights were trained with QuickGELU: use the `-quickgelu` model names.)
"""
import argparse, sys
from pathlib import Path

DROP = ('input_resolution', 'context_length', 'vocab_size', 'attn_mask')   # attn_mask: a buffer open_clip rebuilds itself


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('archive', type=Path, help="OpenAI's TorchScript .pt (e.g. ViT-B-16.pt)")
    p.add_argument('out', type=Path, help='the weights-only file to write')
    p.add_argument('--overwrite', action='store_true')
    a = p.parse_args(argv)
    import torch
    if a.out.exists() and not a.overwrite:
        print(f'error: {a.out} exists (pass --overwrite)', file=sys.stderr); return 1
    try:
        ts = torch.jit.load(str(a.archive), map_location='cpu')
    except Exception as e:
        print(f'error: {a.archive} is not a TorchScript archive ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})',
              file=sys.stderr)
        return 1
    sd = {k: (v.float() if v.is_floating_point() else v).clone() for k, v in ts.state_dict().items() if k not in DROP}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + '.tmp')
    torch.save(sd, tmp); tmp.replace(a.out)
    torch.load(a.out, weights_only=True)      # the point of the file: it loads with the weights-only loader
    print(f'{len(sd)} tensors -> {a.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
