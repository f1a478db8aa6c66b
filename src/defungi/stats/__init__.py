"""The statistics of answers, without torch (the ONNX path and the reports import them): scores per
image and per specimen with bootstrap intervals over specimens, calibration (metrics), conformal
prediction sets (conformal) and selective answers with their promise (selective)."""
