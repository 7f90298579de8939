"""The official datasets' rules, as plain Python shared by the data readers and the evaluators.

- :mod:`vlmoe.protocols.vqa`: the VQA evaluator's answer normalisation, its per-question accuracy and
  the soft scores BEiT-3 / VLMo train against;
- :mod:`vlmoe.protocols.nlvr2`: NLVR2 identifiers (image files, consistency groups);
- :mod:`vlmoe.protocols.coco`: reading a COCO annotation file.

A leaf: it imports nothing of vlmoe but the file readers of :mod:`vlmoe.io`, so ``vlmoe.data``
(training targets) and ``vlmoe.metrics`` (scores) follow the same rules without importing each other.
"""
