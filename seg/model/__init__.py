from seg.model.unet import UNet, build_model, count_parameters

__all__ = ["UNet", "build_model", "count_parameters"]
