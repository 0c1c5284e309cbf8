"""Detection: boxes and confidences for lesions (nodules, metastases), with MONAI's RetinaNet."""
