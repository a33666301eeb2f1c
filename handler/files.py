"""The files of an exported model folder (``<run>/model/``): what export writes, archive packs and the server reads.

One name each, here: the export, the archive, the engines, the Triton repository and the handler take them from
this module rather than spelling them out.
"""

WEIGHTS = "model.pt"  # the state_dict (TorchServe's --serialized-file)
METADATA = "metadata.json"  # the contract: arch, classes, preprocessing, calibration, trust, engines
INDEX_TO_NAME = "index_to_name.json"  # TorchServe's label file
SCORES = "ood.pt"  # the trust score's training bank (handler.trust)
INT8_WEIGHTS = "model-int8.pt"  # when the export offered int8 on torch
ONNX = "model.onnx"  # when the export wrote the portable graph
# model.onnx quantized, when the export was asked for int8: OpenVINO's IR, the graph and the weights it names
INT8_GRAPH_FILES = ("model-int8.xml", "model-int8.bin")
INT8_GRAPH = INT8_GRAPH_FILES[0]
