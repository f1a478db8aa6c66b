"""The statistics of answers, without torch (the ONNX path and the reports import them): scores per
image and per specimen with bootstrap intervals over specimens, calibration (metrics), conformal
prediction sets (conformal), selective answers with their promise (selective) and the refusal
score's arithmetic: its whitening, thresholds and tiers (refusal)."""
