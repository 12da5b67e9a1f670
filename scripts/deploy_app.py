"""MONAI Deploy application: the DICOM series of a study in, the anomaly mask out as DICOM SEG.

DICOM study -> series selection (MR) -> volume -> the bundle's ``inference.json`` (embedded in ``models/model.ts``) run
by MONAI Deploy's ``MonaiBundleInferenceOperator`` -> ``DICOMSegmentationWriterOperator`` (one segment, "anomaly").

The operator casts ``pred`` to uint8; the bundle makes ``pred`` the binary anomaly mask when it has a calibrated
threshold (``LabelAsPredd``), so ``models/model.ts`` must be exported with one embedded
(``configs/export.json`` after ``models/thresholds.json`` exists); this app refuses a model without one.

The SDK (``monai-deploy-app-sdk`` 4.0 with Holoscan 4.6) runs on a CPU-only Linux x86_64 host too (docs/clients.md)::

    pip install -r requirements.txt && pip install --no-deps -r requirements-deploy.txt
    ulimit -s 32768  # the stack size Holoscan asks for
    cd cddpm_bundle && python -m monai.bundle run --config_file "['configs/inference.json','configs/export.json']"
    cd .. && python scripts/deploy_app.py --bundle cddpm_bundle -i <folder of DICOM files> -o <output folder>
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def embedded_config(model_ts: Path) -> tuple[dict, dict]:
    """The ``metadata.json`` and ``inference.json`` embedded in a TorchScript bundle file, where MONAI Deploy reads
    them: ``<file stem>/extra/`` inside the archive."""
    with zipfile.ZipFile(model_ts) as archive:
        read = lambda name: json.loads(archive.read(f"{model_ts.stem}/extra/{name}"))  # noqa: E731
        try:
            return read("metadata.json"), read("inference.json")
        except KeyError as e:
            where = f"{model_ts.stem}/extra/"
            raise ValueError(f"{model_ts}: no embedded configs under {where} (renamed after export?)") from e


def check_model(model_ts: Path) -> dict:
    """The embedded metadata of ``model_ts``, after checking that MONAI Deploy can run it: the file exists, its
    configs are where Deploy looks, and a calibrated threshold is embedded (else ``pred`` is the float map, which the
    operator's uint8 cast turns to zeros)."""
    if not model_ts.is_file():
        raise FileNotFoundError(f"{model_ts}: not found; export it with configs/export.json")
    meta, config = embedded_config(model_ts)
    if config.get("threshold") is None or isinstance(config["threshold"], str):
        raise ValueError(
            f"{model_ts}: no calibrated threshold embedded; run evaluate.json (writes models/thresholds.json), "
            "then configs/export.json again"
        )
    return meta


def build_app(bundle: Path, argv: list[str]):
    """The Deploy ``Application`` for ``bundle`` (imports the SDK, which needs Holoscan)."""
    from monai.deploy.conditions import CountCondition
    from monai.deploy.core import Application, Image, IOType
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
    from monai.deploy.operators.monai_bundle_inference_operator import (
        BundleConfigNames,
        IOMapping,
        MonaiBundleInferenceOperator,
    )
    from pydicom.sr.codedict import codes

    model_ts = bundle / "models" / "model.ts"
    meta = check_model(model_ts)
    sys.path.insert(0, str(bundle))  # the embedded config imports the bundle's scripts package

    class AnomalySegApp(Application):
        def compose(self) -> None:
            context = Application.init_app_context(argv)
            loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=Path(context.input_path))
            selector = DICOMSeriesSelectorOperator(self, rules=json.dumps(MR_SERIES), name="series_selector")
            to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
            infer = MonaiBundleInferenceOperator(
                self,
                input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
                output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
                app_context=context,
                bundle_config_names=BundleConfigNames(config_names=["inference"]),
                bundle_path=model_ts,
                name="anomaly_inference",
            )
            segment = SegmentDescription(
                segment_label="anomaly",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Lesion,
                algorithm_name=meta["name"],
                algorithm_family=codes.DCM.ArtificialIntelligence,
                algorithm_version=meta["version"],
            )
            writer = DICOMSegmentationWriterOperator(
                self, segment_descriptions=[segment], output_folder=Path(context.output_path), name="seg_writer"
            )
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(to_volume, infer, {("image", "image")})
            self.add_flow(infer, writer, {("pred", "seg_image")})
            self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})

    return AnomalySegApp()


MR_SERIES = {"selections": [{"name": "MR series", "conditions": {"Modality": "(?i)MR"}}]}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="cddpm_bundle", help="bundle folder (holding models/model.ts)")
    args, deploy_args = parser.parse_known_args(argv)
    bundle = Path(args.bundle) if Path(args.bundle).is_dir() else REPO / args.bundle
    build_app(bundle.resolve(), [sys.argv[0], *deploy_args]).run()  # Deploy reads -i/-o/-m from its argv
    return 0


if __name__ == "__main__":
    sys.exit(main())
