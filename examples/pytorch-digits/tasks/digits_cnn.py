"""train_central.py, federated: the same model, loaders and loops, wrapped
in a flctl.torch.TorchTask instead of a main(). Each host's agent imports
this module from the deployed tasks folder; train_central.py travels with it.
"""

from __future__ import annotations

from flctl.torch import TorchData, TorchTask

from .train_central import Net, load_data as loaders, test, train


class DigitsCNN(TorchTask):
    def model(self):
        return Net()

    @staticmethod
    def load_data(path, params):
        return TorchData(*loaders(path, int(params.get("batch_size", 32))))

    def train(self, model, data, config):
        return {"train_loss": train(model, data.train, config["epochs"], config["lr"],
                                    self.device)}

    def test(self, model, data, config):
        loss, accuracy = test(model, data.test, self.device)
        return loss, {"accuracy": accuracy}
