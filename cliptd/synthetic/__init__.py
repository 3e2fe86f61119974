"""The embedded default synthetic world of cliptd.

A small, fully controlled stand-in for VCR, SNLI-VE and VQA v2, written in their *real*
file formats (so the real readers load it unchanged), with two visual domains (``source``
for training, ``target`` for domain shift), box and domain files, and caption corpora for
pre-training a CLIP-like teacher and a VL-BERT-like student.

``cliptd.synthetic.world.generate_world(root, seed, scale)`` / ``python -m cliptd.synthetic --out DIR``
write it; the renderer and vocabularies (``cliptd.synthetic.scene``) are public for reuse.
"""
