// Data storage account: the versioned model artifacts (`models`) and the batch containers
// (`batch-in`, `batch-out`). Shared keys off (Entra ID only), no public blobs, TLS 1.2, HTTPS only.
// Blob versioning and soft delete are account-wide settings in Azure Storage; the lifecycle
// policy below removes batch files (and their versions) after the retention period, so in
// practice only `models` keeps history.

@description('Azure region.')
param location string

@description('Storage account name (3-24 lowercase letters and digits).')
@minLength(3)
@maxLength(24)
param name string

@description('Redundancy. Standard_LRS by default; GRS/ZRS/GZRS for geo- or zone-redundancy.')
@allowed([
  'Standard_LRS'
  'Standard_GRS'
  'Standard_ZRS'
  'Standard_GZRS'
])
param sku string = 'Standard_LRS'

@description('Container of the versioned model artifact sets and the pointer to the current one.')
param modelsContainerName string = 'models'

@description('Container the utilities drop billing exports into (Event Grid blob trigger source).')
param batchInContainerName string = 'batch-in'

@description('Container the batch function writes results, summaries and rejected rows to.')
param batchOutContainerName string = 'batch-out'

@description('Days after the last modification before batch inputs and outputs are deleted.')
@minValue(1)
@maxValue(3650)
param batchRetentionDays int = 30

@description('Days a deleted or overwritten blob (or a deleted container) can be restored.')
@minValue(1)
@maxValue(365)
param softDeleteRetentionDays int = 30

@description('Tags for every resource.')
param tags object = {}

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: sku
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    isVersioningEnabled: true
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
  }
}

resource models 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: modelsContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource batchIn 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: batchInContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource batchOut 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: batchOutContainerName
  properties: {
    publicAccess: 'None'
  }
}

// The Event Grid blob trigger writes blobs that keep failing to the queue
// `webjobs-blobtrigger-poison` of the trigger's own connection (STORAGE): create it here so the
// app needs no right to create queues.
resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: 'webjobs-blobtrigger-poison'
}

resource lifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'delete-batch-files'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: [
                '${batchInContainerName}/'
                '${batchOutContainerName}/'
              ]
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: batchRetentionDays
                }
              }
              version: {
                delete: {
                  daysAfterCreationGreaterThan: batchRetentionDays
                }
              }
            }
          }
        }
      ]
    }
  }
  dependsOn: [
    batchIn
    batchOut
  ]
}

output id string = account.id
output name string = account.name
output blobEndpoint string = account.properties.primaryEndpoints.blob
output queueEndpoint string = account.properties.primaryEndpoints.queue
output modelsContainerName string = models.name
output batchInContainerName string = batchIn.name
output batchOutContainerName string = batchOut.name
output poisonQueueName string = poisonQueue.name
