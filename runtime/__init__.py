"""flowae.runtime: the torch-free part that ships to the device (onnxruntime, numpy, Pillow, click).

It never imports torch, torchvision, the training modules of flowae or flowae.export.
"""
