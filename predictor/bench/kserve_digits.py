"""KServe's Python model server serving the predictor's TorchScript digits model, for
scripts/bench-predictor.sh: the same model file, the same v1 request (base64 PNG), the same
preprocessing (pixels / 255, [N, 1, 28, 28]) and the same answer (class ids).

Run: python kserve_digits.py --model_dir predictor/model/mnist --model_name mnist --http_port 8090
(needs `pip install kserve torch pillow numpy`).
"""

import argparse
import base64
import io
import os

import numpy as np
import torch
from PIL import Image

import kserve


class TorchScriptDigits(kserve.Model):
    def __init__(self, name: str, model_dir: str):
        super().__init__(name)
        self.model_dir = model_dir
        self.model = None
        self.load()

    def load(self) -> bool:
        # One intra-op thread, as the predictor's default: on a small machine shared with the
        # load generator, more threads only make OpenMP spin against it.
        torch.set_num_threads(int(os.environ.get("KSERVE_TORCH_THREADS", "1")))
        self.model = torch.jit.load(os.path.join(self.model_dir, "model.pt"))
        self.model.eval()
        self.ready = True
        return self.ready

    def predict(self, payload, headers=None, response_headers=None):
        images = []
        for instance in payload["instances"]:
            png = base64.b64decode(instance["data"])
            images.append(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(images)).unsqueeze(1)
        with torch.no_grad():
            logits = self.model(x)
        return {"predictions": logits.argmax(1).tolist()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_dir", required=True)
    args, _ = parser.parse_known_args()
    model = TorchScriptDigits(args.model_name, args.model_dir)
    # KServe's defaults (one worker, request logging on), except gRPC: only HTTP is compared.
    kserve.ModelServer(http_port=args.http_port, enable_grpc=False).start([model])
