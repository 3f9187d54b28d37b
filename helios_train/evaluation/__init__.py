"""Evaluation of video generators: numbers that say how well a generated video continues its ground truth and how
far it drifts, computed on CPU from frames alone (numpy uint8 [F, H, W, 3] RGB, or float in [0, 1]) — per-frame
and per-33-frame-chunk signal metrics (`frame_metrics`), prompt adherence on the procedural miniature world
(`tracker`), and the HeliosBench metrics that need no model weights, with a registry that skips the weight-based
ones when their weights are absent (`heliosbench`).
"""
