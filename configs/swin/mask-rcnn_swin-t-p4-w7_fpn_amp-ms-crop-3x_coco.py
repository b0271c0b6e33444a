# Mixed precision (fp16 with dynamic loss scaling on GPUs).
_base_ = './mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py'
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
