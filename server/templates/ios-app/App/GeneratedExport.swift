// Written by `atelier export ios-app` from {{EXPORT_JSON_NAME}} (Atelier {{ATELIER_VERSION}}).
// What this app was generated for; the manifest in the model folder, when present, wins.

import Foundation

enum GeneratedExport {
    /// The app's display name.
    static let appName = {{APP_NAME_LITERAL}}
    /// Where the models come from: bundled in the app, or imported through the Files app.
    static let modelSource: ModelSource = .{{MODEL_SOURCE}}
    /// The bundled export folder (`--embed`), nil when models are imported.
    static var bundledModelsURL: URL? { {{BUNDLED_MODELS_URL}} }
    /// The base model the export was made from.
    static let baseModel = {{BASE_MODEL_LITERAL}}
    /// Short hash of the base model's UNet weights.
    static let baseModelHash = {{BASE_MODEL_HASH_LITERAL}}
    /// The Atelier version that wrote the export.
    static let atelierVersion = {{EXPORT_VERSION_LITERAL}}
    /// The styles baked into the export (one function each when `multifunction`).
    static let styles: [ExportStyle] = [
{{STYLES}}
    ]
    /// The style selected at launch.
    static let defaultStyle = {{DEFAULT_STYLE_LITERAL}}
    /// Whether each package holds one function per style (selected with
    /// `MLModelConfiguration.functionName`, iOS 18 / macOS 15).
    static let multifunction = {{MULTIFUNCTION}}
    /// Image size the models were exported for, in pixels.
    static let width = {{WIDTH}}
    static let height = {{HEIGHT}}
    /// The exported packages (file names in the export folder).
    static let packages: [String] = [{{PACKAGES}}]
    /// Sum of the packages' sizes in bytes, as atelier_export.json records them.
    static let packageBytes: Int64 = {{PACKAGE_BYTES}}
    /// The compiled models `StableDiffusionPipeline(resourcesAt:)` loads from the model folder.
    static let compiledModels: [String] = [{{COMPILED_MODELS}}]
    /// The tokenizer files the pipeline reads beside them.
    static let tokenizerFiles: [String] = ["vocab.json", "merges.txt"]
    /// The manifest copied beside the compiled models.
    static let manifestFile = "atelier_export.json"
}
